"""Side-by-side parity harness: dfkd-bench against the authors' code (see README.md here)."""
