"""The core config defaults: cross-cutting keys only, one comment line per key.

Trainers and datasets declare their own nodes (`config_node()`), attached by fewclip.config when
they are selected; fewclip.config merges files and opts onto these defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from yacs.config import CfgNode


def default_cache_dir() -> str:
    """The user cache, `$XDG_CACHE_HOME/fewclip` (else `~/.cache/fewclip`), not the working
    directory: every sweep, from any folder and with any OUTPUT_DIR, reuses one cache, which is
    safe because every cache key holds all its entries depend on."""
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fewclip")


def get_cfg_defaults() -> CfgNode:
    """Cross-cutting keys only; trainers and datasets attach their own nodes when selected."""
    cfg = CfgNode()
    cfg.OUTPUT_DIR = "output"  # root of run folders: <OUTPUT_DIR>/<dataset>/<trainer>/<recipe>/...
    cfg.RUN_DIR = ""  # explicit run folder; empty = derived from OUTPUT_DIR and the cell's keys
    cfg.RECIPE = "default"  # recipe name in the run folder path (set from the recipe file name)
    cfg.SEED = 1  # training seed: initialisation, batch order, dropout (not which images are shots)
    cfg.DEVICE = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    cfg.PRECISION = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32", "bf16"
    cfg.CACHE_DIR = default_cache_dir()  # decoded images, features, generated datasets
    cfg.PLUGINS = []  # Python files or folders imported before lookup (user datasets/trainers)
    cfg.VERBOSE = False  # log per-step losses
    cfg.TENSORBOARD = False  # TensorBoard scalars (losses, LR, validation) in <run dir>/tensorboard

    cfg.MODEL = CfgNode()
    cfg.MODEL.NAME = "tiny-vit"  # open_clip model name, or a built-in tiny config (tiny-vit)
    cfg.MODEL.PRETRAINED = ""  # open_clip tag, local checkpoint file, or "" (random init)
    cfg.MODEL.HF_HUB = ""  # "hf-hub:org/name" id resolved from the local Hugging Face cache

    cfg.DATASET = CfgNode()
    cfg.DATASET.NAME = "SyntheticMultiCenter"  # registered dataset class
    # name in run folders, tables and figures; "" = the YAML's file stem for generic datasets
    # (ImageFolder, CSVDataset), the class name otherwise
    cfg.DATASET.DISPLAY_NAME = ""
    cfg.DATASET.ROOT = ""  # data folder; "" = the dataset's default (generated data: CACHE_DIR)
    cfg.DATASET.NUM_SHOTS = 4  # training images per class (per class and center, see SHOTS_PER)
    cfg.DATASET.SPLIT_SEED = 1  # which images become the few shots and the val/test split
    cfg.DATASET.SHOTS_PER = "class"  # "class" or "class_center"
    cfg.DATASET.INSUFFICIENT_SHOTS = "error"  # class smaller than shots: "error" or "take_all"
    cfg.DATASET.VAL_SHOTS = 4  # validation images per class (0 = the whole validation split)
    cfg.DATASET.VAL_FRACTION = (
        0.2  # share of each class held out for validation (no official split)
    )
    cfg.DATASET.TEST_FRACTION = 0.3  # share of each class held out for testing (no official split)
    cfg.DATASET.SOURCE_CENTERS = []  # centers to train and test in-domain on; empty = all
    cfg.DATASET.TARGET_CENTERS = []  # external centers evaluated separately (all their images)
    cfg.DATASET.POSITIVE_CLASSES = []  # class names of the positive side of the binary view
    cfg.DATASET.PROMPT_FILE = ""  # YAML of per-class prompts; "" = the dataset's own
    cfg.DATASET.CLASS_NAMES = []  # class folder names in label order (generic datasets)
    cfg.DATASET.CENTERS = []  # center folder names (generic datasets); empty = discover
    cfg.DATASET.SKIP_UNREADABLE = False  # skip (and count) unreadable images instead of failing
    # decode every image of the pool once before a sweep's first cell, so a corrupt file is found
    # before any training, not when a seed draws it as a shot (False: skip the check on a huge set)
    cfg.DATASET.CHECK_IMAGES = True
    cfg.DATASET.SPLIT_DIR = ""  # where split files go; "" = <OUTPUT_DIR>/splits
    cfg.DATASET.TRAIN_FRACTION = 0.0  # label efficiency: share of each class's training pool
    # (seeded by SPLIT_SEED, nested across fractions) used instead of NUM_SHOTS; 0 = off
    cfg.DATASET.TRAIN_FRACTION_ROUNDING = "floor"  # per-class count: floor int(f*n) or ceil

    cfg.INPUT = CfgNode()
    cfg.INPUT.AUGMENT = "crop_flip"  # training augmentation: "crop_flip" or "none"
    cfg.INPUT.CROP_SCALE = (0.5, 1.0)  # RandomResizedCrop scale range
    cfg.INPUT.CROP_INTERPOLATION = "bilinear"  # resampling of the random crops: bilinear, bicubic
    cfg.INPUT.STORE_SIZE = 0  # short side kept in the decoded-image store; 0 = the model input

    cfg.LORA = CfgNode()
    cfg.LORA.ENCODER = "vision"  # "vision", "text" or "both"
    cfg.LORA.LAYERS = []  # block indices; empty = all blocks (see TOP_K)
    cfg.LORA.TOP_K = 0  # if > 0 and LAYERS empty: only the last TOP_K blocks
    cfg.LORA.TARGETS = ["q", "k", "v", "out"]  # any of q, k, v, out, mlp
    cfg.LORA.RANK = 2  # LoRA rank r
    cfg.LORA.ALPHA = 1.0  # LoRA alpha (the delta is scaled by alpha / r or alpha / sqrt(r))
    cfg.LORA.SCALING = "alpha_over_r"  # "alpha_over_r" or "alpha_over_sqrt_r" (rsLoRA, CLIP-LoRA)
    cfg.LORA.DROPOUT = 0.25  # dropout on the LoRA input
    cfg.LORA.TEXT_RANK = 0  # rank for the text encoder when ENCODER=both; 0 = RANK

    cfg.OPTIM = CfgNode()
    cfg.OPTIM.LR = 2e-4  # peak learning rate (AdamW)
    cfg.OPTIM.WEIGHT_DECAY = 1e-2  # AdamW weight decay (not applied to norms, biases, scales)
    cfg.OPTIM.MIN_LR = 1e-6  # cosine schedule floor
    cfg.OPTIM.WARMUP_ITERS = 0  # linear warm-up iterations
    cfg.OPTIM.WARMUP_FRACTION = 0.0  # warm-up as a share of the iterations (if WARMUP_ITERS is 0)
    cfg.OPTIM.WARMUP_CONSTANT_LR = 0.0  # > 0: warm-up holds this lr (Dassl's constant warm-up)
    cfg.OPTIM.ITERS_PER_SHOT = 50  # iterations = ITERS_PER_SHOT x NUM_SHOTS (as CLIP-LoRA)
    cfg.OPTIM.MAX_ITERS = 0  # if > 0, overrides ITERS_PER_SHOT
    cfg.OPTIM.BATCH_SIZE = 32  # training batch size
    cfg.OPTIM.GRAD_CLIP = 0.0  # max gradient norm; 0 = off
    # the cosine's length in iterations after the warm-up; 0 = all of them. Shorter: past it the
    # lr rises again along the cosine, as torch's CosineAnnealingLR does past T_max
    cfg.OPTIM.COSINE_ITERS = 0
    cfg.OPTIM.DECAY_ALL = False  # True: the shared AdamW decays biases, norms and scales too
    # > 0: stop when the epoch-mean training loss has not fallen below its best for this many
    # epochs in a row (an epoch = ceil(N / batch) iterations); 0 = off. COSINE_ITERS and this
    # act in the shared loop (TrainerBase.fit), not in trainers with their own (LP++, CLAP, ...)
    cfg.OPTIM.EARLY_STOP_EPOCHS = 0

    cfg.EVAL = CfgNode()
    cfg.EVAL.BATCH_SIZE = 256  # evaluation batch size
    cfg.EVAL.VAL_EVERY = 0  # validate every N iterations (0 = only at the end)
    cfg.EVAL.SELECT = "last"  # "last" or "best_val": which weights are tested (never the test set)
    cfg.EVAL.ECE_BINS = 15  # bins of the expected calibration error
    cfg.EVAL.RETRIEVAL = []  # k values of retrieval metrics against the training images; [] = off
    cfg.EVAL.RETRIEVAL_NORMALISE = "centre_then_normalise"  # or normalise_then_centre (unit first)
    cfg.EVAL.CROSS_DATASET = ""  # dataset YAML evaluated through LABEL_MAP after training; "" = off
    cfg.EVAL.CROSS_DATASET_OPTS = []  # KEY VALUE opts for that dataset, e.g. [DATASET.ROOT, /data]
    cfg.EVAL.LABEL_MAP = ""  # YAML mapping this dataset's classes to the other dataset's classes

    cfg.CHECKPOINT = CfgNode()
    cfg.CHECKPOINT.EVERY = 500  # save the training state every N iterations to resume; 0 = off

    cfg.PERF = CfgNode()  # speed only: what is computed stays the same (up to float rounding)
    cfg.PERF.CHANNELS_LAST = False  # channels_last images and conv weights (conv stems on GPU)
    cfg.PERF.COMPILE = False  # torch.compile the image tower: minutes to compile, for long runs
    cfg.PERF.DEVICE_IMAGES_MB = 1024  # training images up to this size stay on the GPU
    cfg.PERF.THREADS = 0  # torch threads; 0 = usable CPUs (affinity, SLURM, cgroup) / --jobs

    cfg.TRAINER = CfgNode()
    cfg.TRAINER.NAME = "CLIPLoRA"  # registered trainer class
    return cfg
