"""Gap Preserving Distillation: the dynamic teacher (IR), the student view and CBR extraction."""

from gpd_ds.gpd.expand import IRCheckError, UnsupportedModelError, check_ir, expand, supported_modules
from gpd_ds.gpd.extract import ExtractionError, check_equivalence, extract, student_state_dict
from gpd_ds.gpd.mode import MODES, STUDENT, TEACHER
from gpd_ds.gpd.model import BOTH, GPDModel, GPDOutput

__all__ = [
    "BOTH", "MODES", "STUDENT", "TEACHER", "ExtractionError", "GPDModel", "GPDOutput", "IRCheckError",
    "UnsupportedModelError", "check_equivalence", "check_ir", "expand", "extract", "student_state_dict",
    "supported_modules",
]
