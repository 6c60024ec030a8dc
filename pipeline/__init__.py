"""The transfer-learning pipeline's stages (`python -m pipeline.<stage>`).

Importing the package first pins the CPU numerics (pipeline/infra/numerics.py) before any stage module loads numpy, scipy
or torch: those read their kernel and thread settings once, when they load. `PIPELINE_NUMERICS=native` opts out.
"""
from pipeline.infra import numerics as _numerics

_numerics.pin()
