"""Self-KD: the objective that runs teacher, student and loss for a micro-batch
(objective.py), the chunked answer-token loss as pure functions (loss.py), and the shared /
frozen / EMA teachers (teachers.py)."""
