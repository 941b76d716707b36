"""The packaged experiment configs, installed as ``cil.configs``: ``cil run simplecil/digits`` runs
``configs/simplecil/digits.yaml`` from any folder, and ``cil list`` names them all. Bases live in ``base/``."""
