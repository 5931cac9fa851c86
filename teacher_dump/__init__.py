"""Stage 1: run the teacher once and write the cache."""
