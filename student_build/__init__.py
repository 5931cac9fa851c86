"""make-student: composed students (a vision tower, an LM, a fresh projector) and pruned ones (a teacher's layers)."""
