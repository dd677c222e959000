"""The recipe of an encoded image set: which local features, which encoder and vocabulary
made its vectors, so that new images (search queries) are encoded exactly as the indexed
ones were.

A recipe is stored as JSON inside every encodings file and sharded folder
(:mod:`vladkit.pipeline.encodings`, :mod:`vladkit.pipeline.sharded`) and in every index
folder. For the "netvlad" encoder, the "vocabulary" file is a NetVLAD parameters file
(:func:`vladkit.load_netvlad`); the two kinds of file are told apart by their format.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..encoders import (BoFEncoder, FisherEncoder, LLCEncoder, NetVLADEncoder, SpatialPyramid, SuperVectorEncoder,
    VLADEncoder)
from ..encoders.asmk import ASMKEncoder
from ..encoders.netvlad_params import NetVLADParams, is_netvlad_file, load_netvlad
from ..features.extractors import SIFT, DenseSIFT
from ..vocabulary.gmm import GMMVocabulary
from ..vocabulary.kmeans import KMeansVocabulary
from ..vocabulary.fileformat import _jsonable
from ..vocabulary.base import _Vocabulary
from ..vocabulary.loading import load_vocabulary

__all__ = ["EncodingsFileError", "Recipe", "load_vocabulary_file", "locate_vocabulary"]

ENCODERS = {"bof": BoFEncoder, "vlad": VLADEncoder, "fisher": FisherEncoder, "netvlad": NetVLADEncoder,
            "llc": LLCEncoder, "sv": SuperVectorEncoder, "asmk": ASMKEncoder}
EXTRACTORS = {"SIFT": SIFT, "DenseSIFT": DenseSIFT}


class EncodingsFileError(ValueError):
    """An encodings file vladkit cannot use (the message says why)."""


def describe_extractor(extractor):
    """``DenseSIFT(step=4, sizes=(4, 6, 8, 10), ...)``: the parameters that change the
    descriptors (not the thread count, the pixel limit or the error policy). Stored in vocabularies as
    their ``descriptor_type``; :func:`parse_extractor` reads it back."""
    shown = _jsonable_deep(_recipe_params(extractor))
    shown = {k: tuple(v) if isinstance(v, list) else v for k, v in shown.items()}
    return f"{type(extractor).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _recipe_params(extractor):
    """The extractor's parameters that change the descriptors. ``spatial_augmentation``
    only when set: an absent one means none, so descriptions and recipes of plain
    features are those written before the option existed."""
    return {k: v for k, v in extractor.get_params().items()
            if k not in ("n_jobs", "max_pixels", "on_error")
            and not (k == "spatial_augmentation" and v is None)}


def parse_extractor(text):
    """(class name, parameters) from :func:`describe_extractor`'s text, or None if the
    text is not such a description (a vocabulary trained from the API may hold anything)."""
    try:
        call = ast.parse(text or "", mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in EXTRACTORS
            and not call.args):
        return None
    try:
        params = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except ValueError:
        return None
    valid = EXTRACTORS[call.func.id]().get_params()
    return call.func.id, {k: v for k, v in params.items() if k in valid}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Recipe:
    """How images become vectors: extractor + encoder (+ pyramid) + vocabulary file."""

    extractor: str                 # "SIFT" or "DenseSIFT"
    extractor_params: dict
    encoder: str                   # "bof", "vlad", "fisher", "netvlad", "llc" or "sv"
    encoder_params: dict = field(default_factory=dict)
    pyramid: list | None = None    # levels [[n_x, n_y], ...] or None
    vocabulary_path: str = ""      # a vocabulary file, or NetVLAD parameters for "netvlad"
    vocabulary_sha256: str = ""

    @classmethod
    def make(cls, extractor, vocabulary_path, encoder=None, pyramid=None, **encoder_params):
        """The recipe of ``extractor`` (a SIFT or DenseSIFT) with the vocabulary (or NetVLAD
        parameters) file at ``vocabulary_path``, encoded by ``encoder`` ("bof", "vlad",
        "fisher", "netvlad", "llc", "sv"; default: Fisher for a GMM, VLAD for k-means, NetVLAD for its
        parameters) with ``encoder_params``, optionally in a spatial ``pyramid`` (levels
        such as ``[(1, 1), (2, 2), (1, 3)]``)."""
        kind = type(extractor).__name__
        if kind not in EXTRACTORS:
            raise TypeError(f"extractor must be one of {sorted(EXTRACTORS)}, got {kind}")
        params = _recipe_params(extractor)
        vocabulary = load_vocabulary_file(vocabulary_path)
        encoder = encoder or default_encoder(vocabulary)
        check_encoder(encoder, vocabulary)
        recipe = cls(kind, params, encoder, dict(encoder_params),
                     None if pyramid is None else [list(level) for level in pyramid],
                     os.path.realpath(vocabulary_path), file_sha256(vocabulary_path))
        return recipe.with_encoder_defaults(vocabulary)

    def with_encoder_defaults(self, vocabulary):
        """This recipe with every encoder parameter that shapes the vectors recorded,
        defaults included, and only those: the vocabulary is given, so the ones that
        would train one (its size, PCA, sample) are not used (the vocabulary file records
        how it was trained). NetVLAD's "params" are the file itself."""
        _, encoder = self.build(vocabulary, n_jobs=1)
        inner = encoder.encoder if self.pyramid is not None else encoder
        unused = {"vocabulary", "params", "n_jobs", getattr(inner, "_size_param", None), "n_words", "pca",
                  "passthrough_dims", "max_descriptors", "random_state"}
        params = {k: v for k, v in inner.get_params(deep=False).items() if k not in unused}
        return dataclasses.replace(self, encoder_params=params)

    def build(self, vocabulary=None, n_jobs=-1):
        """(extractor, fitted encoder). ``vocabulary``: a loaded vocabulary (or
        NetVLADParams), or a path overriding the recorded one."""
        if isinstance(vocabulary, (_Vocabulary, NetVLADParams)):
            vocab = vocabulary
        else:
            path = vocabulary or self.vocabulary_path
            if not os.path.isfile(path):
                raise EncodingsFileError(f"vocabulary file {path!r} not found (it was used to encode: "
                                         "pass its new place as vocabulary=)")
            vocab = load_vocabulary_file(path)
        check_encoder(self.encoder, vocab)
        extractor = EXTRACTORS[self.extractor](**self.extractor_params, n_jobs=n_jobs)
        if isinstance(vocab, NetVLADParams):
            encoder = NetVLADEncoder(params=vocab, **self.encoder_params)
            dim = vocab.dim
        else:
            encoder = ENCODERS[self.encoder](vocabulary=vocab, **self.encoder_params)
            dim = vocab.descriptor_dim_
        if self.pyramid is not None:
            encoder = SpatialPyramid(encoder, levels=[tuple(level) for level in self.pyramid])
        empty = np.zeros((0, dim), np.float32)
        return extractor, encoder.fit([empty])

    def to_json(self):
        return {
            "extractor": {"class": self.extractor, "params": _jsonable_deep(self.extractor_params)},
            "encoder": {"kind": self.encoder, "params": _jsonable(self.encoder_params)},
            "pyramid": self.pyramid,
            "vocabulary": {"path": self.vocabulary_path, "sha256": self.vocabulary_sha256},
        }

    @classmethod
    def from_json(cls, data):
        try:
            extractor, encoder = data["extractor"], data["encoder"]
            if extractor["class"] not in EXTRACTORS or encoder["kind"] not in ENCODERS:
                raise KeyError("class")
            params = dict(extractor["params"])
            if "sizes" in params:
                params["sizes"] = tuple(params["sizes"])
            return cls(extractor["class"], params, encoder["kind"], dict(encoder["params"]),
                       data.get("pyramid"), data["vocabulary"]["path"], data["vocabulary"]["sha256"])
        except (KeyError, TypeError) as exc:
            raise EncodingsFileError(f"the recipe is incomplete or unknown ({exc})") from None


def locate_vocabulary(recipe, encodings_path, given=None):
    """The path of the vocabulary file that encoded the images of ``encodings_path``.

    The file is recognised by its content, the SHA-256 the recipe records, not by its
    name: ``given`` if it matches; else the recorded path; else, for a project folder that
    was moved or copied, a vocabulary file beside the encodings file (same folder).

    Raises
    ------
    EncodingsFileError
        Naming what was tried, when no file has the recorded content.
    """
    sha256 = recipe.vocabulary_sha256
    if given is not None:
        if not os.path.isfile(given):
            raise EncodingsFileError(f"vocabulary file {os.fspath(given)!r} not found")
        if file_sha256(given) != sha256:
            raise EncodingsFileError(
                f"{os.fspath(given)!r} is not the vocabulary that encoded {os.fspath(encodings_path)!r} (its "
                "SHA-256 differs from the recorded one): queries would not be encoded as the indexed images")
        return os.fspath(given)
    if os.path.isfile(recipe.vocabulary_path) and file_sha256(recipe.vocabulary_path) == sha256:
        return recipe.vocabulary_path
    folder = os.path.dirname(os.path.abspath(encodings_path))
    for name in sorted(os.listdir(folder)):
        candidate = os.path.join(folder, name)
        if _looks_like_vocabulary(candidate) and file_sha256(candidate) == sha256:
            return candidate
    raise EncodingsFileError(
        f"the vocabulary that encoded {os.fspath(encodings_path)!r} is missing or has changed since: not at "
        f"its recorded place {recipe.vocabulary_path!r} nor beside the encodings; give the file it was "
        "(same content) with --vocab FILE, or vocabulary= in Python")


def _looks_like_vocabulary(path):
    """A vladkit vocabulary .npz, judged from its member names (cheap: no hashing of
    large encodings files that share the folder)."""
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return "metadata.npy" in names and not names & {"vectors.npy", "ids.npy"}


def _plain(value):
    """numpy scalars as Python numbers, sequences (the bin sizes) as lists of them."""
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def _jsonable_deep(params):
    """Extractor parameters as plain JSON values."""
    return {key: _plain(value) for key, value in params.items()}


def default_encoder(vocabulary):
    """Fisher vectors for a GMM, VLAD for k-means words, NetVLAD for NetVLAD parameters."""
    if isinstance(vocabulary, NetVLADParams):
        return "netvlad"
    return "fisher" if isinstance(vocabulary, GMMVocabulary) else "vlad"


def load_vocabulary_file(path):
    """A vocabulary (:func:`~vladkit.load_vocabulary`) or NetVLAD parameters
    (:func:`~vladkit.load_netvlad`), told apart by the file's format."""
    return load_netvlad(path) if is_netvlad_file(path) else load_vocabulary(path)


def recorded_descriptor_type(vocabulary):
    """The extractor description a vocabulary or NetVLAD parameters record (or None)."""
    if isinstance(vocabulary, NetVLADParams):
        return vocabulary.metadata.get("descriptor_type")
    return vocabulary.get_params().get("descriptor_type")


def check_encoder(kind, vocabulary):
    """Refuse (ValueError) an encoder kind that cannot use this vocabulary: "netvlad"
    needs NetVLAD parameters, and NetVLAD parameters encode with "netvlad" only."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r}: one of {sorted(ENCODERS)}")
    if kind == "netvlad" and not isinstance(vocabulary, NetVLADParams):
        raise ValueError(f"the netvlad encoder needs NetVLAD parameters (a file from 'vladkit netvlad train' "
                         f"or save_netvlad), got a {type(vocabulary).__name__}: encode with bof, vlad, "
                         "fisher, llc or sv, or give a NetVLAD file")
    if kind != "netvlad" and isinstance(vocabulary, NetVLADParams):
        raise ValueError(f"the {kind} encoder needs a vocabulary (from 'vladkit vocab build'), got NetVLAD "
                         "parameters: they encode with the netvlad encoder only")
    needed = getattr(ENCODERS[kind], "_vocabulary_class", None) or (KMeansVocabulary if kind == "asmk" else None)
    if needed is not None and isinstance(vocabulary, _Vocabulary) and not isinstance(vocabulary, needed):
        build = "--kind gmm" if needed is GMMVocabulary else "--kind kmeans"
        raise ValueError(f"the {kind} encoder needs a {needed.__name__} ('vladkit vocab build {build}'), got a "
                         f"{type(vocabulary).__name__}")
