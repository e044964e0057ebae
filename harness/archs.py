"""Named real architectures (shapes only, no weights): for `random:<arch>` models and analytic FLOPs.

Dimensions are those of the released checkpoints' configs (see reference/lisa-on-transformers.md A9):
CLIP ViT-L/14 (224 or 336 px), LLaMA-1/Vicuna-7B and LLaMA-2-13B, SAM ViT-H, and Phi-1.5 (PSALM's LLM).
"""

from __future__ import annotations

CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048, vocab_size=32004)
LLAMA2_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, rms_norm_eps=1e-5, max_position_embeddings=4096, vocab_size=32003)
SAM_VIT_H = dict(
    vision=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120, image_size=1024,
                patch_size=16, window_size=14, global_attn_indexes=[7, 15, 23, 31], output_channels=256),
    prompt=dict(hidden_size=256, image_size=1024, image_embedding_size=64, patch_size=16),
    decoder=dict(hidden_size=256, mlp_dim=2048, num_attention_heads=8, iou_head_hidden_dim=256, num_hidden_layers=2),
)
# Phi-1.5 (PSALM's LLM): parallel attention + non-gated GELU MLP; only used for analytic FLOPs.
PHI_1_5 = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
               num_key_value_heads=32, mlp_matrices=2)


def _lisa(llm: dict, image_size: int = 224, projector: str = "linear") -> dict:
    return dict(vision={**CLIP_L14, "image_size": image_size}, llm=llm, sam=SAM_VIT_H, projector=projector,
                seg_out_dim=256)


# name -> SegModelConfig fields (sam=None: a plain LLaVA without the mask branch)
ARCHS: dict[str, dict] = {
    "lisa-7b": _lisa(LLAMA_7B),
    "lisa-13b": _lisa(LLAMA2_13B),
    "llava-1.5-7b-224": {**_lisa(LLAMA_7B, 224, "mlp2x_gelu"), "sam": None},
    "llava-1.5-7b-336": {**_lisa(LLAMA_7B, 336, "mlp2x_gelu"), "sam": None},
    "llava-1.5-13b-224": {**_lisa(LLAMA2_13B, 224, "mlp2x_gelu"), "sam": None},
    "llava-1.5-13b-336": {**_lisa(LLAMA2_13B, 336, "mlp2x_gelu"), "sam": None},
    # Token Routing's Table 4: N = 450 tokens, 256 of them image tokens and 100 mask queries (the answer)
    "psalm-phi-1.5": dict(vision=None, llm=PHI_1_5, sam=None, projector=None, seg_out_dim=None,
                          tokens=dict(text=194, answer=100, image=256)),
}
