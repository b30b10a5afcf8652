"""Self-KD: the chunked answer-token loss (loss.py) and the shared / frozen / EMA teachers
(teachers.py)."""
