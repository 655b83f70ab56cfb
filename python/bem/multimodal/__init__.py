"""bem.multimodal — image evidence into the router and the model (docs/multimodal.md): an embedded
image task generated in code, a small patch encoder with LLaVA's mlp2x_gelu projector placing 64
visual tokens as a prefix chunk, controller integration (image-routed LoRA experts), coverage
analysis, image-keyed KV caching and `bem run --suite multimodal`."""
from bem._lazy import lazy_exports

_EXPORTS = {
    "IMAGE_SIZE": "images", "KINDS": "images", "MULTIMODAL_VERSION": "images",
    "ImageExample": "images", "generate_images": "images", "render": "images",
    "NUM_VISUAL_TOKENS": "vision", "Projector": "vision", "VisionEncoder": "vision",
    "VisionTower": "vision", "check_images": "vision", "image_digest": "vision",
    "ImageRouter": "model", "MultimodalLM": "model",
    "generate": "generation", "model_digest": "generation", "visual_routing_key": "generation",
    "region_mass": "coverage",   # the full analysis: bem.multimodal.coverage.coverage
    "MultimodalConfig": "suite", "run_multimodal": "suite",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
