"""The omni model: composition of a Hugging Face VLM (through a family adapter), a Whisper
encoder and an audio projector (omni.py, adapters.py), its processor (processing.py), the
tiny preset (tiny.py) and synthetic contract batches for tests and benchmarks (synthetic.py)."""
