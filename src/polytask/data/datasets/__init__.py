"""One module per dataset: its reader (the published on-disk format, or the embedded renderer) and
its datamodule."""
