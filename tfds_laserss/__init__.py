"""TFDS builders (ArrayRecord, manual_dir, no TensorFlow): laserss, rrsisd, refsegrs, earthreason.

Importing this package registers the builders with tfds, so `tfds.data_source('laserss', ...)` and
`tfds build` find them.
"""
from tfds_laserss.earthreason import Earthreason
from tfds_laserss.laserss import Laserss
from tfds_laserss.refsegrs import Refsegrs
from tfds_laserss.rrsisd import Rrsisd

BUILDERS = {"laserss": Laserss, "rrsisd": Rrsisd, "refsegrs": Refsegrs, "earthreason": Earthreason}

__all__ = ["BUILDERS", "Laserss", "Rrsisd", "Refsegrs", "Earthreason"]
