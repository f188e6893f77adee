"""Data-prep transforms, one module each: resampling, truncation, bucketing."""
