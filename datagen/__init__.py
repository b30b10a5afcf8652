"""Offline data generation, separate from training: text normalisation for speech
(normalize.py), text-to-speech engines (tts.py: eSpeak NG through ctypes, or any command),
WebDataset shard writing from LLaVA JSON or ASR manifests (writer.py), and the demo's
shape scenes (demo.py). The trainer never imports this package; tools/ does."""
