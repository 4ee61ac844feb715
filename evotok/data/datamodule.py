"""One LightningDataModule for every stage; the stage selects which fields a batch carries."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from evotok.data import DataError
from evotok.data.sources import build_dataset
from evotok.data.views import item_text  # noqa: F401  (re-exported)



def _spec(stage: str):
    from evotok.stages import get_stage

    return get_stage(stage).batch


def stage_fields(item: dict, stage: str) -> dict:
    """Map a common-schema item to the fields of ``stage`` (its registry entry's batch view)."""
    return _spec(stage).view_fn()(item)


class StageView(Dataset):
    """A map-style dataset seen through one stage (optionally a subset of indices)."""

    def __init__(self, base: Dataset, stage: str, indices: Optional[Sequence[int]] = None) -> None:
        self.base, self.stage = base, stage
        self.indices = list(indices) if indices is not None else None
        self.view = _spec(stage).view_fn()

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        j = self.indices[i] if self.indices is not None else i
        if self.indices is not None and isinstance(i, EpochIndex):
            j = EpochIndex(j, i.epoch)
        return self.view(self.base[j])


class IterableStageView(IterableDataset):
    """A streaming dataset seen through one stage, keeping only samples of the stage's task."""

    def __init__(self, base: IterableDataset, stage: str) -> None:
        self.base, self.stage = base, stage

    def __len__(self) -> int:
        """The base's length (a WebDataset source: this rank's samples per epoch); TypeError when it has none."""
        return len(self.base)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.base, "set_epoch", None)):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        spec = _spec(self.stage)
        view = spec.view_fn()
        for item in self.base:
            if not spec.task or item["task"] in (spec.task, ""):
                yield view(item)


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed the worker's own numpy / random from the seed torch gave the worker."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class EpochIndex(int):
    """A sample index that carries the epoch it was drawn for, so that per-sample randomness (augmentation,
    evotok.data.sources) can be a function of (seed, epoch, index) alone: identical in any worker and after a
    resume. It is an ``int`` everywhere else."""

    epoch: int

    def __new__(cls, value: int, epoch: int) -> "EpochIndex":
        obj = super().__new__(cls, value)
        obj.epoch = int(epoch)
        return obj

    def __reduce__(self):  # through the worker queues
        return (EpochIndex, (int(self), self.epoch))


class EpochShuffle(Sampler[int]):
    """A random order of ``range(n)`` that depends only on (seed, epoch): a run resumed in any epoch sees the
    order the uninterrupted run saw. Lightning calls ``set_epoch`` at the start of every epoch. The indices are
    :class:`EpochIndex` values (they carry the epoch to the dataset)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter([EpochIndex(i, self.epoch) for i in torch.randperm(self.n, generator=gen).tolist()])


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning saves in checkpoints (``state_dict``: batches served in this epoch) and that
    continues after the last batch a restored run trained on, so a run killed mid-epoch neither repeats
    nor skips a batch. Skipped batches are drawn and dropped (cheap for memory-mapped EvoShapes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served, self._skip = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        served = int(state.get("served", 0))
        self._skip = served if served < len(self) else 0  # saved after the last batch: a new epoch starts

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        it, skip = super().__iter__(), self._skip
        self._served, self._skip = 0, 0
        for _ in range(skip):
            next(it)
            self._served += 1
        for batch in it:
            self._served += 1
            yield batch


class EvoTokDataModule(L.LightningDataModule):
    """Train / val / test loaders of ``cfg.data.source`` shaped for ``stage``: the registry entry's batch view
    and collate (evotok/stages.py), or ``collate_fn`` when the stage's module makes its own (tokenisation,
    padding and label masks for the language-model stages).

    The train order depends only on (data.seed, epoch) and the train loader resumes mid-epoch
    (EpochShuffle, ResumableLoader); under DDP Lightning swaps in its DistributedSampler. EvoShapes caches
    are built in prepare_data (once per node)."""

    def __init__(self, cfg: Any, stage: str, collate_fn: Optional[Callable[[list], Any]] = None) -> None:
        super().__init__()
        spec = _spec(stage)  # an unknown stage fails here, naming the stages
        self.cfg, self.stage = cfg, stage
        self.collate_fn = collate_fn or spec.collate_fn()
        self._datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ datasets
    def prepare_data(self) -> None:
        if self.cfg.data.source == "evoshapes":
            for split in ("train", "val", "test"):
                build_dataset(self.cfg.data, split)

    def setup(self, stage: Optional[str] = None) -> None:
        """Lightning's ``stage`` (fit/validate/test/predict) picks which splits to build now."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage or "", ("train", "val", "test")):
            self.dataset(split)

    def dataset(self, split: str) -> Dataset:
        """The stage view of ``split`` (train | val | test | heldout), built once."""
        if split not in self._datasets:
            self._datasets[split] = self._stage_view(self.raw_dataset(split))
        return self._datasets[split]

    def raw_dataset(self, split: str) -> Dataset:
        """The common-schema dataset of ``split`` (every field)."""
        return build_dataset(self.cfg.data, split)

    def _stage_view(self, base: Dataset) -> Dataset:
        if isinstance(base, IterableDataset):
            return IterableStageView(base, self.stage)
        want = _spec(self.stage).task
        tasks = getattr(base, "tasks", None)
        if want and tasks is not None:
            idx = [i for i, t in enumerate(tasks) if t in (want, "")]
            if not idx:
                raise DataError(f"stage '{self.stage}': source '{self.cfg.data.source}' (data.root = "
                                f"'{self.cfg.data.root}') has no {want} samples")
            return StageView(base, self.stage, idx)
        return StageView(base, self.stage)

    # --------------------------------------------------------------- dataloaders
    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def dataloader(self, split: str, shuffle: bool = False, batch_size: Optional[int] = None,
                   drop_last: bool = False, indices: Optional[Sequence[int]] = None) -> DataLoader:
        """A loader for any split (train/val/test/heldout), batches shaped for the stage; ``indices``: only
        those items of a map-style split (e.g. one rank's share)."""
        ds = self.dataset(split)
        if indices is not None:
            from torch.utils.data import Subset

            ds = Subset(ds, list(indices))
        d = self.cfg.data
        bs = int(batch_size or d.batch_size)
        iterable = isinstance(ds, IterableDataset)
        gen = torch.Generator().manual_seed(int(d.seed) + self._epoch())
        return DataLoader(
            ds, batch_size=bs, shuffle=shuffle and not iterable,
            drop_last=drop_last and not iterable and len(ds) >= bs,  # type: ignore[arg-type]
            generator=gen, **self._loader_kwargs(),
        )

    def _loader_kwargs(self) -> dict[str, Any]:
        """Workers, collate and pinning: the same for every loader."""
        d = self.cfg.data
        kwargs: dict[str, Any] = {
            "num_workers": int(d.num_workers), "collate_fn": self.collate_fn, "pin_memory": torch.cuda.is_available(),
        }
        if d.num_workers > 0:
            kwargs.update(persistent_workers=True, worker_init_fn=seed_worker, prefetch_factor=2)
        return kwargs

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        bs, seed = int(self.cfg.data.batch_size), int(self.cfg.data.seed)
        if isinstance(ds, IterableDataset):
            if not callable(getattr(ds, "set_epoch", None)):
                return self.dataloader("train", shuffle=True, drop_last=True)
            # WebDataset: the shard order and each rank's equal share follow (data.seed, epoch); a resumed
            # run starts at its epoch, and ResumableLoader skips the batches it already trained on
            ds.set_epoch(self._epoch())  # type: ignore[attr-defined]
            gen = torch.Generator().manual_seed(seed + self._epoch())
            return ResumableLoader(ds, batch_size=bs, generator=gen, **self._loader_kwargs())
        return ResumableLoader(
            ds, batch_size=bs, sampler=EpochShuffle(len(ds), seed), drop_last=len(ds) >= bs,  # type: ignore[arg-type]
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")
