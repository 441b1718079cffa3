"""What each VBench / VBench-2.0 dimension needs: weight files (where each must go, where it comes from).

Paths are those the installed code reads (vbench 0.1.5, vbench2 0.1.1, local mode), relative to one of
the cache roots the harness points the evaluator at (see :mod:`harness.eval.vbench.environment`):
``vbench`` ($VBENCH_CACHE_DIR), ``vbench2`` ($VBENCH2_CACHE_DIR), ``torch`` ($TORCH_HOME) and ``hf``
($HF_HOME). Nothing is ever downloaded by the harness: a missing file is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import HarnessError
from harness.registry import Registry

CACHE_ROOTS = ("vbench", "vbench2", "torch", "hf")


@dataclass(frozen=True)
class WeightFile:
    """One file (or folder) a dimension loads, relative to a cache root."""

    root: str  # one of CACHE_ROOTS
    path: str
    source: str  # where a user with internet gets it
    folder: bool = False


@dataclass(frozen=True)
class Dimension:
    """One dimension of a benchmark: the files it loads and whether it can run on custom prompts."""

    name: str
    benchmark: str  # "vbench" or "vbench2"
    weights: tuple[WeightFile, ...]
    needs: str  # the model or algorithm, in words
    custom_input: bool = True  # False: needs VBench's own prompts (auxiliary info), so standard mode
    packages: tuple[str, ...] = ()  # extra Python modules outside the pinned environment
    #: How the harness's figure departs from the benchmark's official protocol ("" if it does not): carried
    #: into the record's evaluation and printed under every table that shows the dimension.
    protocol_note: str = ""


def _vb(path: str, source: str, folder: bool = False) -> WeightFile:
    return WeightFile("vbench", path, source, folder)


def _vb2(path: str, source: str, folder: bool = False) -> WeightFile:
    return WeightFile("vbench2", path, source, folder)


_CLIP_B = _vb("clip_model/ViT-B-32.pt", "OpenAI CLIP ViT-B/32 checkpoint (openaipublic bucket)")
_CLIP_L = _vb("clip_model/ViT-L-14.pt", "OpenAI CLIP ViT-L/14 checkpoint (openaipublic bucket)")
_VICLIP = (
    _vb("ViCLIP/ViClip-InternVid-10M-FLT.pth", "HF OpenGVLab/VBench_Used_Models"),
    _vb("ViCLIP/bpe_simple_vocab_16e6.txt.gz", "copy from the openai-clip package (clip/bpe_simple_vocab_16e6.txt.gz)"),
)
_BERT = WeightFile("hf", "hub/models--bert-base-uncased", "HF bert-base-uncased (tokenizer and model)", folder=True)
_GRIT = (_vb("grit_model/grit_b_densecap_objectdet.pth", "HF OpenGVLab/VBench_Used_Models"), _BERT)
_RAFT = _vb("raft_model/models/raft-things.pth", "RAFT authors' models.zip (unzip into raft_model/)")
_DINO = (
    _vb("dino_model/facebookresearch_dino_main", "git clone of github.com/facebookresearch/dino", folder=True),
    _vb("dino_model/dino_vitbase16_pretrain.pth", "dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain"),
    WeightFile(
        "torch", "hub/checkpoints/dino_vitbase16_pretrain.pth", "the same DINO file (DINO's hubconf loads it here)"
    ),
)

VBENCH_DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("subject_consistency", "vbench", _DINO, "DINO ViT-B/16 frame features"),
    Dimension("background_consistency", "vbench", (_CLIP_B,), "CLIP ViT-B/32 frame features"),
    Dimension(
        "temporal_flickering",
        "vbench",
        (),
        "no model: mean absolute difference of consecutive frames",
        protocol_note=(
            "not VBench's protocol for this dimension, which samples 25 videos per prompt and scores only those "
            "its RAFT static filter keeps (at most 5 static ones); the harness scores the run's own videos "
            "unfiltered, moving ones included, so its figure usually reads lower and does not compare with "
            "published ones"
        ),
    ),
    Dimension("motion_smoothness", "vbench", (_vb("amt_model/amt-s.pth", "HF lalala125/AMT"),), "AMT-S interpolation"),
    Dimension("dynamic_degree", "vbench", (_RAFT,), "RAFT optical flow"),
    Dimension(
        "aesthetic_quality",
        "vbench",
        (_CLIP_L, _vb("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth", "LAION-AI/aesthetic-predictor")),
        "LAION aesthetic head on CLIP ViT-L/14",
    ),
    Dimension(
        "imaging_quality",
        "vbench",
        (_vb("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", "chaofengc/IQA-PyTorch release v0.1-weights"),),
        "MUSIQ (SPAQ)",
    ),
    Dimension("overall_consistency", "vbench", _VICLIP, "ViCLIP video-text similarity"),
    Dimension("temporal_style", "vbench", _VICLIP, "ViCLIP video-text similarity"),
    Dimension("appearance_style", "vbench", (_CLIP_B,), "CLIP ViT-B/32 image-text similarity", custom_input=False),
    Dimension(
        "scene",
        "vbench",
        (_vb("caption_model/tag2text_swin_14m.pth", "HF space xinyu1205/recognize-anything"), _BERT),
        "Tag2Text captions",
        custom_input=False,
    ),
    Dimension(
        "human_action",
        "vbench",
        (_vb("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth", "HF OpenGVLab/VBench_Used_Models"),),
        "UMT ViT-L/16 (Kinetics-400)",
    ),
    *(
        Dimension(name, "vbench", _GRIT, "GRiT dense captioning", custom_input=False, packages=("detectron2",))
        for name in ("object_class", "multiple_objects", "color", "spatial_relationship")
    ),
)

_LLAVA = _vb2(
    "lmms-lab/LLaVA-Video-7B-Qwen2", "HF lmms-lab/LLaVA-Video-7B-Qwen2 (plus its SigLIP tower in HF_HOME)", True
)
_QWEN = _vb2("Qwen/Qwen2.5-7B-Instruct", "HF Qwen/Qwen2.5-7B-Instruct", folder=True)
_COTRACKER = (
    WeightFile("torch", "hub/facebookresearch_co-tracker_main", "torch.hub facebookresearch/co-tracker", True),
    WeightFile("torch", "hub/checkpoints/cotracker2.pth", "HF facebook/cotracker (cotracker2.pth)"),
)
_LLM_PACKAGES = ("llava", "flash_attn")

VBENCH2_DIMENSIONS: tuple[Dimension, ...] = (
    Dimension(
        "Human_Anatomy",
        "vbench2",
        (
            _vb2(
                "YOLO-World/yolo_world_v2_xl_obj365v1_goldg_cc3mlite_pretrain-5daf1395.pth", "Google Drive (VBench-2.0)"
            ),
            *(_vb2(f"anomaly_detector/{part}.pth", "Google Drive (VBench-2.0)") for part in ("human", "face", "hand")),
        ),
        "YOLO-World detector + ViT anomaly classifiers",
        packages=("mmcv", "mmdet", "mmyolo"),
    ),
    Dimension(
        "Human_Identity",
        "vbench2",
        (
            _vb2("arcface/resnet18_110.pth", "Google Drive (VBench-2.0)"),
            WeightFile("torch", "hub/checkpoints/retinaface_resnet50_2020-07-20-f168fae3c.zip", "ternaus/retinaface"),
        ),
        "RetinaFace + ArcFace",
        packages=("retinaface",),
    ),
    *(
        Dimension(
            name,
            "vbench2",
            (_LLAVA,),
            "LLaVA-Video-7B VQA",
            custom_input=name == "Human_Clothes",
            packages=_LLM_PACKAGES,
        )
        for name in (
            "Human_Clothes",
            "Composition",
            "Dynamic_Spatial_Relationship",
            "Dynamic_Attribute",
            "Motion_Rationality",
            "Mechanics",
            "Thermotics",
            "Material",
        )
    ),
    *(
        Dimension(
            name,
            "vbench2",
            (_LLAVA, _QWEN),
            "LLaVA-Video-7B description judged by Qwen2.5-7B",
            custom_input=False,
            packages=_LLM_PACKAGES,
        )
        for name in ("Complex_Landscape", "Complex_Plot", "Human_Interaction", "Motion_Order_Understanding")
    ),
    Dimension(
        "Diversity",
        "vbench2",
        (WeightFile("torch", "hub/checkpoints/vgg19-dcbb9e9d.pth", "torchvision VGG19 ImageNet weights"),),
        "VGG19 Gram-matrix and feature distances between a prompt's 20 videos",
    ),
    Dimension("Camera_Motion", "vbench2", _COTRACKER, "CoTracker2 point tracks", custom_input=False),
    Dimension(
        "Multi-View_Consistency",
        "vbench2",
        (*_COTRACKER, _vb2("raft_model/models/raft-things.pth", "RAFT authors' models.zip")),
        "CoTracker2 + RAFT + patch matching",
    ),
    Dimension(
        "Instance_Preservation",
        "vbench2",
        (_vb2("YOLO-World/yolo_world_v2_l_obj365v1_goldg_pretrain_1280ft-9babe3f6.pth", "Google Drive (VBench-2.0)"),),
        "YOLO-World-L detector (the 0.1.1 wheel; repo HEAD uses a LoRA video VLM instead)",
        custom_input=False,
        packages=("mmcv", "mmdet", "mmyolo"),
    ),
)

DIMENSIONS: dict[str, Registry[Dimension]] = {
    "vbench": Registry("VBench dimension"),
    "vbench2": Registry("VBench-2.0 dimension"),
}
for _dimension in (*VBENCH_DIMENSIONS, *VBENCH2_DIMENSIONS):
    DIMENSIONS[_dimension.benchmark].add(_dimension.name, _dimension)


def dimension(benchmark: str, name: str) -> Dimension:
    """The catalogue entry of ``name`` (did-you-mean error for unknown names)."""
    return DIMENSIONS[benchmark].get(name)


def check_custom_input(benchmark: str, names: tuple[str, ...]) -> None:
    """Refuse dimensions that need VBench's own prompts when the run's prompts are not VBench's."""
    refused = [name for name in names if not dimension(benchmark, name).custom_input]
    if refused:
        raise HarnessError(
            f"{', '.join(refused)} need{'s' if len(refused) == 1 else ''} VBench's own prompts (auxiliary "
            f"information); generate from a prompt set (--prompts {benchmark}:<dimension>) to score "
            f"{'it' if len(refused) == 1 else 'them'}"
        )
