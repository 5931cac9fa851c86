"""Stage 2: train a student from the cache alone (the teacher is never loaded)."""
