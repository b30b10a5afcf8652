"""The omni model: its architecture (omni.py: a Hugging Face VLM through a family adapter
(adapters.py), a Whisper encoder and an audio projector), building and composing it
(build.py), saving and loading it (serialize.py), its processor (processing.py), the tiny
preset (tiny.py) and synthetic batches for tests and benchmarks (synthetic.py)."""
