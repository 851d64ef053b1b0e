"""Generation parameters as Fooocus writes and reads them (spec §13), and back into a request.

Writing: :class:`MetadataInput` (what the pipeline knows after a job) -> :func:`build_metadata_list`
(Fooocus's ``(label, key, value)`` list, §13.1) -> :func:`to_fooocus_scheme` (JSON, §13.2) or
:func:`to_a1111_scheme` (text, §13.3). :mod:`engine.io.imageio` puts the string into the file.

Reading: :func:`parse_parameters` turns either scheme into Fooocus's parsed dict (§13.6 steps 2-3,
quirks included), and :func:`parameters_to_request` maps that dict, a log.html entry or a pasted
parameter block onto a :class:`~engine.core.request.GenerationRequest` the way Fooocus's "Load
Parameters" fills its UI (§13.6 step 4). Names that are not installed locally are dropped with a
warning, as Fooocus does (its dropdowns keep their current value), so the request stays valid.

Torch-free; nothing happens at import.

Split by direction: labels.py (tables both share), write.py, read.py; this package re-exports
the public names.
"""

from engine.io.metadata.labels import A1111_SAMPLER_NAMES, CIVITAI_NO_KARRAS
from engine.io.metadata.read import (
    StyleSource,
    extract_styles_from_prompt,
    parameters_to_request,
    parse_log_html,
    parse_parameters,
    request_from_image,
    request_from_image_file,
    request_from_log_block,
    request_from_log_file,
)
from engine.io.metadata.write import (
    MetadataInput,
    build_metadata_list,
    default_version_string,
    metadata_text,
    to_a1111_scheme,
    to_fooocus_scheme,
)

__all__ = [
    "A1111_SAMPLER_NAMES", "CIVITAI_NO_KARRAS", "MetadataInput", "StyleSource", "build_metadata_list",
    "default_version_string", "extract_styles_from_prompt", "metadata_text",
    "parameters_to_request", "parse_log_html", "parse_parameters", "request_from_image",
    "request_from_image_file", "request_from_log_block", "request_from_log_file", "to_a1111_scheme",
    "to_fooocus_scheme",
]
