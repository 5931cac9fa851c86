"""`alignti rollout`: the student's own answers (or its candidates on the reference answers) as a dataset for
`dump-teacher` (on-policy rounds; see student_rollout/rollout.py)."""
