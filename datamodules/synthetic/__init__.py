"""Generated data that needs no download: the datasets behind ``make demo`` and the tests."""

from datamodules.synthetic.shapes import KEYPOINT_FLIP_PAIRS, KEYPOINT_NAMES, SHAPE_CLASSES, render_shapes
from datamodules.synthetic.shapes_detection import ShapesDetectionDataModule, ShapesSource
from datamodules.synthetic.identities import SyntheticFacesDataModule, identity_params, make_pairs, render_identity
from datamodules.synthetic.shapes_segmentation import ShapesSegmentationDataModule
from datamodules.synthetic.figures_keypoints import FiguresKeypointDataModule
from datamodules.synthetic.streams import SyntheticStreamsDataModule, make_feature_streams
