"""Self-KD trainer for omni (vision + audio) LLMs on DeepSpeed ZeRO-3."""
