"""The data layer: read, validate, clean, register and tokenize datasets. Never imports gradio."""

from studio.data.audit import DoctorFinding, DoctorReport, FixResult, apply_fixes, diagnose
from studio.data.clean import CleanOptions, CleanReport, clean_examples
from studio.data.errors import DataError, RowError, RowIssue
from studio.data.formats import (
    FORMATS,
    ColumnMap,
    Example,
    Message,
    detect_format,
    guess_column_map,
    row_to_example,
)
from studio.data.llamafactory import ImportReport, import_dataset_info, map_entry
from studio.data.readers import SUPPORTED_EXTENSIONS, file_columns, read_rows
from studio.data.registry import DatasetEntry, DatasetRegistry, validate_dataset_name
from studio.data.stats import TokenStats, histogram, token_stats
from studio.data.tokenize import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    PackedSample,
    Sample,
    build_sample,
    pack_samples,
    render_preview,
)
from studio.data.validate import ValidationReport, validate_rows

__all__ = [
    "CHATML_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "SUPPORTED_EXTENSIONS",
    "CleanOptions",
    "CleanReport",
    "ColumnMap",
    "DataError",
    "DatasetEntry",
    "DatasetRegistry",
    "DoctorFinding",
    "DoctorReport",
    "Example",
    "FixResult",
    "ImportReport",
    "Message",
    "PackedSample",
    "RowError",
    "RowIssue",
    "Sample",
    "TokenStats",
    "ValidationReport",
    "apply_fixes",
    "build_sample",
    "clean_examples",
    "detect_format",
    "diagnose",
    "file_columns",
    "guess_column_map",
    "histogram",
    "import_dataset_info",
    "map_entry",
    "pack_samples",
    "read_rows",
    "render_preview",
    "row_to_example",
    "token_stats",
    "validate_dataset_name",
    "validate_rows",
]
