"""Evaluation: tasks and their files (tasks), RULER-style generated tasks (ruler_tasks),
scoring (scoring), the evaluation harness (evaluate, followup), the benchmark (benchmark)
and their plots (plots)."""
