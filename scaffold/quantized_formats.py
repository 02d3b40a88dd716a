"""The quantized checkpoint formats the tiny-checkpoint builder writes, and the families whose Hub checkpoints
ship in them (a port of such a family is tested on each). Plain data: the generator reads it without torch."""

QUANTIZATIONS = ("mxfp4", "fp8")

HUB_QUANTIZATIONS = {
    "gpt_oss": ("mxfp4",),  # openai/gpt-oss-20b, -120b
    "llama": ("fp8",),  # block-FP8 Llama 3.x builds (llm-compressor, FineGrainedFP8Config)
    "qwen3": ("fp8",),  # Qwen/Qwen3-*-FP8
    "deepseek_v3": ("fp8",),  # deepseek-ai/DeepSeek-V3, -R1
}
