"""Generated data that needs no download: the datasets behind ``make demo`` and the tests."""

from .shapes import KEYPOINT_FLIP_PAIRS, KEYPOINT_NAMES, SHAPE_CLASSES, render_shapes
from .shapes_detection import ShapesDetectionDataModule, ShapesSource
from .identities import SyntheticFacesDataModule, identity_params, make_pairs, render_identity
from .shapes_segmentation import ShapesSegmentationDataModule
from .figures_keypoints import FiguresKeypointDataModule
from .streams import SyntheticStreamsDataModule, make_feature_streams
