"""Lightning callbacks of lightning_ddd, installed as the top-level ``callbacks`` package."""
