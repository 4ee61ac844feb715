"""The `evotok` command.

    evotok <command> [<stage>] --config PATH_OR_NAME [key=value ...]

Heavy imports (torch, Lightning, transformers) happen inside the command functions, so
``evotok --help`` returns at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from evotok.config import ConfigError, load_config, to_yaml, with_overrides
from evotok.stages import STAGE_NAMES, StageNotBuilt, get_stage

EXIT_USAGE = 2
EXIT_NOT_BUILT = 3


class NotBuilt(Exception):
    """A command or stage of the design that this version does not implement yet."""


# ------------------------------------------------------------------------------------------ helpers


def _config(args, stage: Optional[str] = None) -> "object":
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []) or [], stage=stage)


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", "-c", required=config_required, help="experiment YAML path or a name under experiments/configs/")
    p.set_defaults(accepts_overrides=True)
    p.epilog = "Any number of key=value config overrides may follow, e.g. model.lpix=4 data.batch_size=32."


def _add_run_arg(p: argparse.ArgumentParser, many: bool = False) -> None:
    if many:
        p.add_argument("--run", action="append", required=True, help="run folder (or .ckpt); repeat for several")
    else:
        p.add_argument("--run", required=True, help="run folder (a .ckpt path is accepted too)")


# ----------------------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    cfg = _config(args, args.stage)
    if args.dry_run:
        return _dry_run(cfg, args.stage, args.config)
    from evotok.lit.train import train

    train(cfg, args.stage, argv=sys.argv)
    return 0


def _dry_run(cfg, stage: str, config: Optional[str]) -> int:
    """The resolved config (what the stage reads), the files it came from, then the stage's description of its
    model, or a line saying the stage is not built yet."""
    from evotok.config import BASE_CONFIG, experiment_layers

    entry = get_stage(stage)
    files = [str(BASE_CONFIG)] + ([src for src, _ in experiment_layers(config)] if config else [])
    print(f"# stage {stage}: {entry.summary}")
    print("# config files, merged in order (then command-line overrides): " + " <- ".join(files))
    print(to_yaml(cfg, stage))
    if not entry.built:
        print(f"# stage '{stage}' is not built yet in this version of the suite: no model to describe")
        return 0
    describe = getattr(entry.lit_module(), "describe", None)
    if describe is not None:
        print(describe(cfg))
    return 0


def cmd_eval(args) -> int:
    if args.what == "recon":
        from evotok.eval.recon import evaluate_recon

        evaluate_recon(args.run, split=args.split or "val", max_images=args.max_images, data_overrides=args.overrides or [])
    elif args.what == "vqa":
        from evotok.eval import understand

        if args.overrides:
            raise ConfigError(f"evotok eval vqa takes no key=value overrides, got {' '.join(args.overrides)}")
        if args.depths:
            understand.depth_curve(args.run, args.depths, kinds=args.features.split(","), probe_steps=args.probe_steps,
                                   max_images=args.max_images or 128)
        else:
            understand.evaluate_vqa(args.run, split=args.split or "test", max_images=args.max_images)
    elif args.what in ("pope", "mme"):
        from evotok.eval.understand import evaluate_benchmark

        if not args.file:
            raise ConfigError(f"evotok eval {args.what} needs --file (a local {'jsonl' if args.what == 'pope' else 'tsv'} file)")
        evaluate_benchmark(args.what, args.run, args.file, args.image_root)
    else:  # geneval
        from evotok.config import override_key
        from evotok.eval.geneval import evaluate_geneval

        bad = [o for o in args.overrides if override_key(o) != "checker.run"]
        if bad:
            raise ConfigError(f"evotok eval geneval takes only checker.run=RUN, got {' '.join(bad)}")
        checker = next((o.partition("=")[2] for o in args.overrides), "")
        evaluate_geneval(args.run, checker, n_per_tag=args.prompts, n_samples=args.samples, seed=args.seed,
                         **_sampling_kwargs(args))
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling settings; each one not given comes from the run's gen.* config (gen.cfg_scale, gen.top_k, ...)."""
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none; default: the "
                                                            "run's gen.cfg_scale)")
    p.add_argument("--top-k", default=None, help="one value or one per depth, comma-separated (0 = off; default: gen.top_k)")
    p.add_argument("--top-p", default=None, help="one value or one per depth, in (0, 1] (default: gen.top_p)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: gen.temperature)")
    p.add_argument("--seed", type=int, default=0)


def _sampling_kwargs(args) -> dict:
    from evotok.eval.geneval import parse_per_depth

    return {"cfg_scale": args.cfg, "temperature": args.temperature,
            "top_k": None if args.top_k is None else parse_per_depth(args.top_k, int, "top-k"),
            "top_p": None if args.top_p is None else parse_per_depth(args.top_p, float, "top-p")}


def cmd_generate(args) -> int:
    from evotok.eval.geneval import generate_command

    generate_command(args.run, args.prompt, n=args.n, seed=args.seed, out=args.out, **_sampling_kwargs(args))
    return 0


def cmd_chat(args) -> int:
    from evotok.eval.understand import chat

    if not args.question and not args.interactive:
        raise ConfigError("evotok chat: give a question, or --interactive")
    chat(args.run, args.image, [args.question] if args.question else [], interactive=args.interactive)
    return 0


def cmd_figures(args) -> int:
    from analysis.make_figures import make_figures

    index = make_figures(args.run, args.out, split=args.split, n_images=args.n_images)
    print(f"figures: {Path(index).resolve()}")
    return 0


def cmd_bench(args) -> int:
    if args.what == "data":
        from evotok.data.bench import bench_data

        bench_data(out_dir=args.out, n=1000 if args.quick else 4000)
    elif args.what == "quantizer":
        from evotok.bench.quantizer import bench_quantizer

        bench_quantizer(quick=args.quick, out_dir=args.out)
    elif args.what == "generate":
        from evotok.bench.generate import bench_generate

        bench_generate(out_dir=args.out, run=args.run or None, quick=args.quick)
    return 0


def cmd_data(args) -> int:
    cfg = _config(args)
    if args.what == "preview":
        from evotok.data.preview import write_preview

        out = write_preview(cfg, args.out or "evoshapes_preview.png", n=args.n, split=args.split)
        print(f"preview grid: {Path(out).resolve()}")
    elif args.what == "cache":
        from evotok.data import build_dataset

        for split in ("train", "val", "test", "heldout"):
            ds = build_dataset(cfg.data, split)
            print(f"{split}: {len(ds)} items")
    elif args.what == "codes":
        from evotok.api import read_checkpoint
        from evotok.data.codes import build_codes

        if not args.run:
            raise ConfigError("evotok data codes needs --run TOKENIZER_RUN")
        tok_cfg = read_checkpoint(args.run)[0]
        data = with_overrides(tok_cfg, [o for o in args.overrides or [] if o.startswith("data.")]).data
        build_codes(args.run, data, args.split or "train")
    elif args.what == "shards":
        import dataclasses

        from evotok.data.sources import shard_samples, write_shards

        if not args.out:
            raise ConfigError("evotok data shards needs --out DIR")
        source = args.source or cfg.data.source
        data = dataclasses.replace(cfg.data, source=source, root=args.root or cfg.data.root)
        index = write_shards(shard_samples(data, source, args.split), args.out, args.per_shard, prefix=args.split)
        import json

        counts = [e["nsamples"] for e in json.loads(index.read_text())["shardlist"]]
        print(f"{len(counts)} shard(s), {sum(counts)} samples of {source} split '{args.split}': {index.resolve()}")
    return 0


def cmd_encode(args) -> int:
    from evotok.api import encode_folder

    out = encode_folder(args.run, args.images, args.out, overrides=args.overrides or [])
    print(f"codes: {Path(out).resolve()}")
    return 0


def cmd_decode(args) -> int:
    from evotok.api import decode_to_folder

    out = decode_to_folder(args.run, args.codes, args.depth, args.out)
    print(f"images: {Path(out).resolve()}")
    return 0


def cmd_export(args) -> int:
    from evotok.api import export_safetensors

    out = export_safetensors(args.run, args.out)
    print(f"weights: {Path(out).resolve()}")
    return 0


def cmd_pipeline(args) -> int:
    from evotok.pipeline import PIPELINES, run_pipeline

    if args.name and "=" in args.name:  # a key=value override, not a pipeline name
        args.overrides, args.name = [args.name, *(args.overrides or [])], ""
    if bool(args.name) == bool(args.spec):
        raise ConfigError(f"give a pipeline name ({', '.join(PIPELINES)}) or --spec FILE, not both")
    if args.name and args.name not in PIPELINES:
        raise ConfigError(f"unknown pipeline '{args.name}'; pipelines: {', '.join(PIPELINES)}")
    if args.spec and not Path(args.spec).is_file():
        raise ConfigError(f"--spec {args.spec}: no such file")
    only = [x for x in (args.only or "").split(",") if x]
    run_pipeline(args.spec or args.name, overrides=args.overrides or [], only=only)
    return 0


def cmd_sweep(args) -> int:
    from evotok.sweep import run_sweep, write_sweep_report

    if args.collect:
        index = write_sweep_report(args.spec, args.overrides or [])
        print((index.parent / "ablation.md").read_text(), end="")
        print(f"report: {index.resolve()}")
    else:
        run_sweep(args.spec, executor=args.executor, overrides=args.overrides or [], cluster=args.cluster)
    return 0


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evotok",
        description="EvoTok suite: train, evaluate and analyse residual-latent-evolution image tokenizers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("train", help=f"train a stage ({', '.join(STAGE_NAMES)})")
    p.add_argument("stage", choices=STAGE_NAMES)
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and model size, then exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run a grid of configs x seeds (e.g. Lpix/Lsem), each point a pipeline; "
                                      "--collect aggregates what has finished")
    p.add_argument("--spec", required=True, help="sweep spec: a name under experiments/sweeps (lpix_lsem) or a file")
    p.add_argument("--executor", default="local", choices=("local", "print", "slurm"),
                   help="local: one after another here; print: the command lines; slurm: submitit job arrays")
    p.add_argument("--cluster", default=None, help="submitit cluster for --executor slurm (default: auto; local, debug)")
    p.add_argument("--collect", action="store_true", help="print the ablation table of what has finished, run nothing")
    p.set_defaults(accepts_overrides=True, func=cmd_sweep)
    p.epilog = "key=value overrides that follow apply to every point."

    p = sub.add_parser("pipeline", help="run a multi-stage pipeline (a name, e.g. demo, or --spec FILE); finished "
                                         "stages with an unchanged config are skipped, interrupted ones resume")
    p.add_argument("name", nargs="?", default="", help="pipeline name under experiments/pipelines (demo, tiny, ...)")
    p.add_argument("--spec", default="", help="a pipeline spec file (YAML: run_name, steps)")
    p.add_argument("--only", default="", help="comma-separated stages: run just their steps (upstreams must be finished)")
    p.set_defaults(accepts_overrides=True)
    p.epilog = "key=value overrides that follow apply to every stage."
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("eval", help="evaluate a trained run (recon: per-depth rFID, PSNR, SSIM, CLIPSIM, usage; "
                                    "vqa: questions per type with a blind baseline; pope / mme: local benchmark files)")
    p.add_argument("what", choices=("recon", "vqa", "pope", "mme", "geneval"))
    _add_run_arg(p)
    p.add_argument("--split", default="", help="default: val for recon, test for vqa")
    p.add_argument("--max-images", type=int, default=0, help="0 = the whole split (vqa --depths: 128)")
    p.add_argument("--depths", default="", help="vqa: 'all' or e.g. 1,4,16: the per-depth curve (a short "
                                                "projector-only training per depth and feature kind)")
    p.add_argument("--features", default="semantic,latent", help="vqa --depths: feature kinds to probe")
    p.add_argument("--probe-steps", type=int, default=100, help="vqa --depths: projector steps per probe")
    p.add_argument("--file", default="", help="pope: a jsonl file (image, question, label); mme: a tsv file")
    p.add_argument("--image-root", default="", help="pope / mme: the folder the file's image names are under")
    p.add_argument("--prompts", type=int, default=16, help="geneval: prompts per tag")
    p.add_argument("--samples", type=int, default=4, help="geneval: samples per prompt")
    _add_sampling_args(p)
    p.set_defaults(accepts_overrides=True)
    p.epilog = "key=value data overrides may follow, e.g. data.source=realphotos; geneval: checker.run=RUN."
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("figures", help="rebuild the paper's figures (t-SNE, depth curves, K-means) from run folders")
    _add_run_arg(p, many=True)
    p.add_argument("--out", required=True, help="output folder (index.html + PNG/PDF figures)")
    p.add_argument("--split", default="val")
    p.add_argument("--n-images", type=int, default=512)
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("bench", help="benchmarks (data: EvoShapes speed; quantizer: RVQ kernels; generate: "
                                     "sampling with and without the KV cache)")
    p.add_argument("what", choices=("data", "quantizer", "generate"))
    p.add_argument("--run", default="", help="generate: time a trained generation run (default: random embedded sizes)")
    p.add_argument("--out", default="results", help="folder for the JSON results")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="data tools: preview (labelled sample grid), cache (generate EvoShapes splits), "
                                    "codes (encode a split once with a tokenizer run, for the generation stage), "
                                    "shards (write WebDataset tar shards + index.json; docs/data_sharding.md)")
    p.add_argument("what", choices=("preview", "cache", "codes", "shards"))
    _add_config_args(p)
    p.add_argument("--run", default="", help="codes: the tokenizer run")
    p.add_argument("--out", default="", help="preview: the PNG (default evoshapes_preview.png); shards: the folder")
    p.add_argument("--source", default="", choices=("", "evoshapes", "folder"),
                   help="shards: what to pack (default: data.source)")
    p.add_argument("--root", default="", help="shards --source folder: the image folder (default: data.root)")
    p.add_argument("--per-shard", type=int, default=1000, help="shards: samples per tar shard")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--split", default="train")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("generate", help="generate images from text (generation stage): a PNG grid and the codes")
    _add_run_arg(p)
    p.add_argument("prompt", nargs="?", default="", help="the prompt; empty = unconditional samples")
    p.add_argument("--n", type=int, default=8, help="samples")
    _add_sampling_args(p)
    p.add_argument("--out", default="grid.png", help="PNG grid; the codes go to the same name with .npz")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="ask questions about an image (understanding stage)")
    _add_run_arg(p)
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("question", nargs="?", default="", help="the question (or --interactive)")
    p.add_argument("--interactive", action="store_true", help="keep asking until an empty line")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("encode", help="encode a folder of images to codes (.npz)")
    _add_run_arg(p)
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=cmd_encode, accepts_overrides=True)
    p.epilog = "data.* overrides may follow, e.g. data.on_bad_file=error (default: skip and count unreadable files)."

    p = sub.add_parser("decode", help="decode codes (.npz) to images at a chosen depth")
    _add_run_arg(p)
    p.add_argument("--codes", required=True)
    p.add_argument("--depth", type=int, default=None, help="depth l (default: Lpix)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("export", help="export a tokenizer's weights to safetensors")
    _add_run_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in overrides]
    if unknown or (overrides and not getattr(args, "accepts_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never downloads at run time
    try:
        return int(args.func(args) or 0)
    except (NotBuilt, StageNotBuilt) as e:
        print(f"evotok: {e}", file=sys.stderr)
        return EXIT_NOT_BUILT
    except ConfigError as e:
        print(f"evotok: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # known user-facing errors get one line, the rest a traceback
        from evotok.errors import USER_ERRORS

        if isinstance(e, USER_ERRORS):
            print(f"evotok: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
