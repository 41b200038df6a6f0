"""mlfast: mutual learning for CTR models."""
