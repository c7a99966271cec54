"""Top-down keypoints on the synthetic stick figures: the built-in pose dataset behind the ``rle_shapes`` demo.

The figures (:mod:`datamodules.synthetic.figures`) are written once as a COCO keypoint layout under ``root``
(``annotations/person_keypoints_{train,val}2017.json`` + PNGs; reused on later runs, never overwritten) and
read back by :class:`~datamodules.keypoints.coco.COCOKeypointDataModule`: the same reader, checks, crops and
augmentation as COCO itself, only the source differs. The category (13 keypoints, names, skeleton), the
OKS sigmas (:data:`FIGURE_OKS_SIGMAS`) and the upper body for half-body crops are known without reading the
files, so the CLI can link them before anything is written.
"""

from __future__ import annotations

from datamodules.keypoints.coco import COCOKeypointDataModule, COCOKeypointSource
from datamodules.synthetic.figures import FIGURE_KEYPOINT_NAMES, FIGURE_OKS_SIGMAS, FIGURE_SKELETON, FIGURE_UPPER_BODY_IDS, \
    write_figures_coco


class FiguresKeypointDataModule(COCOKeypointDataModule):
    """Synthetic stick figures as a COCO keypoint dataset (K = 13), written under ``root`` on first use.

    Args:
        root: folder of the generated COCO layout (created; an existing one with the same parameters is reused,
            one with other parameters is an error: choose another root).
        num_train, num_val: images per split (each holds 1-3 figures).
        image_size: side of the square images.
        max_figures: figures drawn per image at most.
        seed: picks the pair of train / validation streams (``2 seed`` and ``2 seed + 1``: no shared image).
        input_size: ``[H, W]`` of the crops (3:4 as the paper's 256x192; small for CPU demos).
        augment, rotation, scale_factor, flip_prob, half_body_prob: training augmentation (the RLE recipe).
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.
    """

    def __init__(
        self,
        root: str = "data/figures",
        num_train: int = 2000,
        num_val: int = 200,
        image_size: int = 128,
        max_figures: int = 3,
        seed: int = 0,
        input_size: list[int] | None = None,
        augment: bool = True,
        rotation: float = 45.0,
        scale_factor: float = 0.25,
        flip_prob: float = 0.5,
        half_body_prob: float = 0.3,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if num_train < 1 or num_val < 1:
            raise ValueError(f"FiguresKeypointDataModule: num_train and num_val must be >= 1, got {num_train}, "
                             f"{num_val}")
        if seed < 0:
            raise ValueError(f"FiguresKeypointDataModule: seed must be >= 0, got {seed}")
        input_size = list(input_size or [128, 96])  # saved as what the CLI links into the task: a list
        super().__init__(
            root=root, train_annotations="annotations/person_keypoints_train2017.json",
            val_annotations="annotations/person_keypoints_val2017.json", train_images="train2017",
            val_images="val2017", input_size=input_size, augment=augment, rotation=rotation,
            scale_factor=scale_factor, flip_prob=flip_prob, half_body_prob=half_body_prob,
            upper_body_ids=list(FIGURE_UPPER_BODY_IDS), keypoint_names=list(FIGURE_KEYPOINT_NAMES),
            skeleton=[list(e) for e in FIGURE_SKELETON], oks_sigmas=list(FIGURE_OKS_SIGMAS), batch_size=batch_size,
            num_workers=num_workers, pin_memory=pin_memory)
        self.generation = dict(splits={"train2017": (num_train, 2 * seed), "val2017": (num_val, 2 * seed + 1)},
                               image_size=image_size, max_figures=max_figures)

    def prepare_data(self) -> None:
        """Write the figures under ``root`` unless they are there (Lightning calls this on one process only)."""
        write_figures_coco(self.root, **self.generation)

    def source(self, split: str) -> COCOKeypointSource:
        if split not in self._sources:
            self.prepare_data()  # outside a Trainer nothing called it; a no-op once written
        return super().source(split)
