"""An output folder: its layout and atomic parts, resume, finishing, and reading it back."""
