"""Functional similarity (DeRy §2): linear CKA between the node boundaries of every pair of models in a zoo.

Reads dissected models and probe images; writes ``similarity.json`` with one npz of CKA matrices per model pair
(see :mod:`reassembly.similarity.stage`).
"""

from .cka import SimilarityError, StreamingCKA, linear_cka
from .stage import SimilarityRun, ZooMember, compute_similarity, load_similarity, load_zoo, similarity_stage

__all__ = ["SimilarityError", "SimilarityRun", "StreamingCKA", "ZooMember", "compute_similarity", "linear_cka",
           "load_similarity", "load_zoo", "similarity_stage"]
