"""The stored format every backend shares: dtypes (`codec.py`) and the blob layout (`layout.py`)."""
