"""A trained digits DiT shipped with the package, so demos and tests run on real denoising offline.

`model.py` loads it and samples with DDIM, `classifier.py` scores samples, `train.py` rebuilds both
weight files from scikit-learn's bundled digits. Importing this package needs diffusers.
"""
