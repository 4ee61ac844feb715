"""LightningModules (one per stage), callbacks and the trainer wiring. Lightning is imported only here and in evotok.data.datamodule."""
