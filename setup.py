"""Build step for the one C extension; everything else about the package is in pyproject.toml.

``datamodules.tfrecord._wire`` (the tf.Example fast path) is optional: without a C compiler the
install still succeeds and parsing uses the protobuf runtime alone (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("datamodules.tfrecord._wire", ["datamodules/tfrecord/_wire.c"],
                             extra_compile_args=["-O3"], optional=True)])
