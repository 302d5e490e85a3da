"""What tests/support/model_nodes.py knows about particular nodes: the inputs and files that cannot
exist here, the widget values that make a node act in a short run of a two-block model, and the
notes of docs/model_nodes.md. Every node without an entry is built from its /object_info alone."""

from __future__ import annotations

# Inputs that no node of this test can produce: (type -> why). A node needing one is not run.
UNAVAILABLE = {
    "CLIP_VISION": "needs a CLIP vision model (ComfyUI builds them at their real sizes only; none here)",
    "CLIP_VISION_OUTPUT": "needs a CLIP vision model's output (none here, as above)",
    "MODEL_PATCH": "needs a model patch file (ComfyUI builds them at their real sizes only; none here)",
}
# File inputs whose folder holds nothing for these families: (input name -> why).
NO_FILES = {
    "control_net_name": "needs a diff ControlNet file (they exist for SD1/SD2 UNets only)",
    "hypernetwork_name": "needs a hypernetwork file (they exist for SD1/SD2 UNets only)",
}

# The merge nodes of one model family (category .../model_specific) ratio blocks by that family's
# block names; the one for a family tested here runs on it, the others are not run.
FAMILY_MERGES = {"ModelMergeWAN2_1": "wan"}

# Widget values other than the defaults, so that the node acts in a short run of a two-block model.
# Besides widgets: "sampler_steps" (the KSampler after the node), "latent_length" (frames of the
# case's own video latent), "noise_mask" (a SetLatentNoiseMask of this value on the latent),
# "model2_diff" (model2 is model2 - model1 by ModelMergeSubtract: the difference an "add difference"
# merge adds; two whole models added make one whose output swings far more than a real merge's).
OVERRIDES: dict[str, dict] = {
    "TrainLoraNode": {"steps": 1, "gradient_checkpointing": False},
    # full rank: the saved factors multiply back to the weights (up to the node's 1% clamp)
    "LoraSave": {"rank": 4096},
    "ModelComputeDtype": {"dtype": "bf16"},  # the CPU computes in fp32: bf16 is a change
    "ScaleROPE": {"scale_x": 2.0},
    "FreSca": {"freq_cutoff": 1},  # the default (20) holds every frequency of an 8x8 latent
    "BasicScheduler": {"scheduler": "beta"},  # the default gives the KSampler's own sigmas
    "ModelMergeAdd": {"model2_diff": True},
    "SkipLayerGuidanceDiT": {"double_layers": "1", "single_layers": "1", "start_percent": 0.0},
    "SkipLayerGuidanceDiTSimple": {"double_layers": "1", "single_layers": "1", "start_percent": 0.0},
    "SkipLayerGuidanceSD3": {"layers": "1", "start_percent": 0.0},
    "EasyCache": {"start_percent": 0.0, "sampler_steps": 4},
    "LazyCache": {"start_percent": 0.0, "sampler_steps": 4},
    "ContextWindowsManual": {"context_length": 2, "context_overlap": 1, "dim": 2, "latent_length": 9},
    "WanContextWindowsManual": {"context_length": 5, "context_overlap": 1, "latent_length": 9},
    "DifferentialDiffusion": {"noise_mask": 0.95, "sampler_steps": 4},
}


# Nodes that must leave the result as it is: their unquantized reference is the plain graph, not the
# node run unquantized (compiling the unquantized models costs some 40 s on 2 CPU cores).
SAME_AS_PLAIN = {"TorchCompileModel"}

# Rows beyond one per node: (label -> class_type, widget values), for a setting that takes another
# path through the quantized weights than the node's defaults.
EXTRA_CASES = {"LoraSave (lora_type full_diff)": ("LoraSave", {"lora_type": "full_diff"})}


# Why a node does nothing, or cannot run, on these families: shown in the note column.
UNET_ONLY = "patches the blocks of SD1/SDXL UNets"
NOTES = {
    "FreeU": f"{UNET_ONLY} (their channel counts)",
    "FreeU_V2": f"{UNET_ONLY} (their channel counts)",
    "HyperTile": f"{UNET_ONLY} (attention tiling)",
    "PatchModelAddDownscale": f"{UNET_ONLY} (input block downscale)",
    "TomePatchModel": f"{UNET_ONLY} (token merging in attn1)",
    "SelfAttentionGuidance": f"{UNET_ONLY} (the middle block's attention map)",
    "PerturbedAttentionGuidance": f"{UNET_ONLY} (the middle block's self-attention)",
    "UNetSelfAttentionMultiply": f"{UNET_ONLY} (attn1 q/k/v/out)",
    "UNetCrossAttentionMultiply": f"{UNET_ONLY} (attn2 q/k/v/out)",
    "UNetTemporalAttentionMultiply": f"{UNET_ONLY} (SVD's temporal attention)",
    "ChromaRadianceOptions": "options of Chroma Radiance's pixel-space decoder",
    "QwenImageDiffsynthControlnet": "a Qwen-Image ControlNet patch",
    "USOStyleReference": "a Flux (USO) style patch",
    "ZImageFunControlnet": "Z-Image's Fun ControlNet patch, which ComfyUI builds at width 3840 only "
    "(the tiny Z-Image is 256 wide)",
    "ImageOnlyCheckpointSave": "saves an image-to-video checkpoint (SVD) with its CLIP vision model",
    "wanBlockSwap": "deprecated: does nothing in ComfyUI 0.8.0 (kept so old workflows load)",
    "RenormCFG": "Lumina 2 / Z-Image guidance (reads the model's in_channels, which Wan has not)",
    "TrainLoraNode": "ComfyUI 0.8.0 cannot backpropagate through these models' RoPE (comfy-kitchen's "
    "rope op has no autograd formula)",
    "LoraModelLoader": "takes the LORA_MODEL of TrainLoraNode, which cannot train these models",
    "SkipLayerGuidanceDiT": "Z-Image's NextDiT takes no block-replace patches (Wan does)",
    "SkipLayerGuidanceDiTSimple": "Z-Image's NextDiT takes no block-replace patches (Wan does)",
    "SkipLayerGuidanceSD3": "Z-Image's NextDiT takes no block-replace patches (Wan does)",
    "LoraSave": "of the whole model (`model_diff` takes any MODEL), rank 4096: errors of the "
    "reconstructed weights",
    "LoraSave (lora_type full_diff)": "the diff it saves of a quantized weight is that packed weight, "
    "whose bytes it used to write as bf16 (and the memory after them): refused instead",
    "ModelSave": "errors of the saved weights",
    "CheckpointSave": "errors of the saved diffusion-model weights (tiny CLIP and VAE beside them)",
    "SamplingPercentToSigma": "the sigma it returns",
    "AddNoise": "noise scaled by the model's sigmas: the weights take no part",
    "ModelMergeAdd": "model2 is ModelMergeSubtract(model2, model1), the difference such merges add",
    "ModelMergeSubtract": "model1 minus its fine-tune: weights near zero, an output that hardly depends "
    "on them",
    "TorchCompileModel": "Inductor on the CPU; against the plain graph unquantized (compiling must not "
    "change the result; compiling the unquantized models too would add some 40 s)",
    "DifferentialDiffusion": "on a latent with a noise mask of 0.95, 4 steps",
    "ContextWindowsManual": "windows of 2 over the frames (Wan: 3 latent frames) or rows (Z-Image)",
    "WanContextWindowsManual": "windows of 5 frames (2 latent frames) over the frames (Wan: 3 latent "
    "frames) or rows (Z-Image)",
}
