"""bem.safety — keeping adaptation from eroding protected behaviour: the orthogonal safety basis
(adapter updates kept orthogonal to protected directions during training), the spectral monitor
(exact ‖s·B A‖₂ from the factors, projection to a spectral budget), the violation detector
(must-refuse, must-not-leak, format policies on streamed outputs) and the controller that ties
them to a training loop and gates updates on violation rates. See docs/safety.md."""
from bem.safety.acceptance import validate_with_violations
from bem.safety.basis import (BasisFit, SafetyBasis, layer_activations, orthogonality_ratio,
                              principal_basis, project_factors)
from bem.safety.controller import SafetyController, adapted_layers
from bem.safety.gate import ViolationGate, violation_gate
from bem.safety.spectral import (ProjectionEvent, SpectralMonitor, SpectralProjection,
                                 lora_spectral_norm, lora_top_singular)
from bem.safety.violations import (FormatConstraint, MustNotLeak, MustRefuse, OutputReport,
                                   Request, ViolationDetector, ViolationStream)

__all__ = ["BasisFit", "FormatConstraint", "MustNotLeak", "MustRefuse", "OutputReport",
           "ProjectionEvent", "Request", "SafetyBasis", "SafetyController", "SpectralMonitor",
           "SpectralProjection", "ViolationDetector", "ViolationGate", "ViolationStream",
           "adapted_layers", "layer_activations", "lora_spectral_norm", "lora_top_singular",
           "orthogonality_ratio", "principal_basis", "project_factors", "validate_with_violations",
           "violation_gate"]
