//! What the policy said, and why: a Cedar response read with Convoy's rule
//! that any evaluation error denies.

use cedar_policy::{Authorizer, Decision as CedarDecision, Entities, PolicyId, Request};
use serde::{Deserialize, Serialize};

use super::{report, PolicySet};

/// What the policy said, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Allowed?
    pub permitted: bool,
    /// The policies that decided (by `@id`, else Cedar's id): the permits
    /// that allowed, or the forbids that denied; empty for a default deny.
    pub policies: Vec<String>,
    /// The `@reason` annotations of those policies, when present.
    pub reasons: Vec<String>,
    /// Evaluation errors (any of which denies), and why a request could not
    /// be built.
    pub errors: Vec<String>,
}

impl Decision {
    /// The deny of an agent that has no policy.
    pub fn no_policy() -> Self {
        Decision::deny_because(
            "no policy loaded: everything is denied (start the agent with --policy and --inventory)"
                .into(),
        )
    }

    pub(super) fn deny_because(error: String) -> Self {
        Decision {
            permitted: false,
            policies: vec![],
            reasons: vec![],
            errors: vec![error],
        }
    }

    /// One line: `permitted by [a]`, `denied by [b] (reason)`, `denied: no
    /// policy permits`, `denied: evaluation error: …`.
    pub fn explain(&self) -> String {
        let reasons = if self.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.reasons.join("; "))
        };
        if !self.errors.is_empty() {
            return format!("denied: {}", self.errors.join("; "));
        }
        match (self.permitted, self.policies.is_empty()) {
            (true, _) => format!("permitted by [{}]{reasons}", self.policies.join(", ")),
            (false, true) => "denied: no policy permits it (default deny)".into(),
            (false, false) => format!("denied by [{}]{reasons}", self.policies.join(", ")),
        }
    }
}

impl PolicySet {
    pub(super) fn evaluate(&self, request: &Request, entities: &Entities) -> Decision {
        let response = Authorizer::new().is_authorized(request, &self.policies, entities);
        let name = |id: &PolicyId| {
            self.names
                .get(&id.to_string())
                .cloned()
                .unwrap_or_else(|| id.to_string())
        };
        let mut policies: Vec<String> = response.diagnostics().reason().map(name).collect();
        policies.sort();
        let mut reasons: Vec<String> = response
            .diagnostics()
            .reason()
            .filter_map(|id| self.policies.annotation(id, "reason").map(str::to_owned))
            .collect();
        reasons.sort();
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => {
                    format!(
                        "policy [{}] failed to evaluate: {}",
                        name(pe.policy_id()),
                        report(pe.inner())
                    )
                }
            })
            .collect();
        Decision {
            // Any error denies, even when a permit matched and no forbid did:
            // an erroring forbid might have been the one to deny.
            permitted: response.decision() == CedarDecision::Allow && errors.is_empty(),
            policies,
            reasons,
            errors,
        }
    }
}
