"""DARTS with sandglass operations: search a cell, derive its genotype, train the network built from it.

Two stages, each a function, a CLI verb and a run directory:

* :func:`search` (``reassembly nas search``) reads a dataset's training split and writes ``genotype.json`` (the
  derived cells), ``alphas.json`` (the architecture weights after every epoch) and per-epoch checkpoints.
* :func:`train` (``reassembly nas train``) reads a genotype (``genotype.json`` or a name like ``DARTS_V2``) and
  writes a trained evaluation network (``network.json`` + ``final.safetensors``) with its training log.

The candidate operations are DARTS's eight plus the sandglass operations ``sg_3x3`` and ``sg_5x5``, built from the
library's own sandglass block; the search spaces ``darts`` (8), ``extend`` (10) and ``replace`` (8, separable convs
swapped for sandglass) name the sets (``operations``). ``search_network`` holds the mixed-operation cells and the
architecture parameters, ``architect`` the first- and second-order alpha updates, ``genotypes`` the genotypes and
their derivation, ``network`` the evaluation network. ``docs/nas.md`` explains the whole.
"""

from .architect import Architect
from .genotypes import (
    DARTS_V1,
    DARTS_V2,
    GENOTYPES,
    Genotype,
    GenotypeError,
    derive_genotype,
    load_genotype,
    parse_cell,
)
from .network import NetworkCIFAR, count_parameters
from .operations import OPERATIONS, SEARCH_SPACES, make_operation, search_space
from .search import SearchSettings, search
from .search_network import SearchNetwork
from .training import load_network, train

__all__ = ["DARTS_V1", "DARTS_V2", "GENOTYPES", "OPERATIONS", "SEARCH_SPACES", "Architect", "Genotype",
           "GenotypeError", "NetworkCIFAR", "SearchNetwork", "SearchSettings", "count_parameters", "derive_genotype",
           "load_genotype", "load_network", "make_operation", "parse_cell", "search", "search_space", "train"]
