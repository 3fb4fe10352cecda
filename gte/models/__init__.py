"""Models: ``registry`` (specs and builders of every architecture), ``weights`` (files: state dicts, gte's
``model.safetensors``, release conversion), ``small`` (the small standard ResNet), ``bcosify`` (a standard CNN → a
B-cos network; registers the ``bcosify/<arch>`` names). The README's Python API imports ``build_model`` /
``load_model`` from here."""

from gte.models.registry import (IMAGENET_MEAN, IMAGENET_STD, REGISTRY, ModelInfo, at_size, check_arch, create, describe,
                                 freeze, get_submodule, info, is_bcos, own_explainer, resized, run_size, to_model_input, with_spec)
from gte.models.bcosify import bcosify
from gte.models.weights import (build_model, convert_release, eval_geometry, load_model, load_weights, model_metadata,
                                read_state_dict, save_model, spec_from_metadata)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "REGISTRY", "ModelInfo", "at_size", "bcosify", "build_model", "check_arch", "convert_release",
           "create", "describe", "eval_geometry", "freeze", "get_submodule", "info", "is_bcos", "load_model", "load_weights", "model_metadata",
           "own_explainer", "read_state_dict", "resized", "run_size", "save_model", "spec_from_metadata", "to_model_input",
           "with_spec"]
