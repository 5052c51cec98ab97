"""verse-cli: turn raw spine CT scans into an annotated, VerSe-style dataset."""

__version__ = "0.1.0"
