//! The whole back half as one function: graph in, verified plan and validated WGSL (with its
//! naga IR) out.

use kiln_ir::{Graph, NodeId, OpPattern};

use crate::launch::{Launch, launch};
use crate::plan::{FuseError, KernelKind, Placement, Plan, fuse_with};
use crate::report::describe;
use crate::target::Target;
use crate::verify_plan::{PlanError, verify_plan};
use crate::wgsl::{CodegenError, KernelModule, NagaModule, emit_validated};

/// A graph compiled for one target.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub graph: Graph,
    pub plan: Plan,
    /// One validated module per kernel, in execution order.
    pub modules: Vec<KernelModule>,
    /// The naga IR of each of `modules`, same order: kept from validation so that nothing
    /// parses the WGSL twice (the runtime's pipelines and the back ends start from it). Not
    /// public, so it cannot fall out of step with `modules` by construction elsewhere.
    naga: Vec<NagaModule>,
}

impl Compiled {
    /// The `--emit kernels` listing.
    pub fn describe(&self) -> String {
        describe(&self.graph, &self.plan)
    }

    /// The naga IR of each kernel, in the order of [`Compiled::modules`].
    pub fn naga(&self) -> &[NagaModule] {
        &self.naga
    }

    /// Each kernel's module beside its naga IR, in execution order.
    pub fn kernels(&self) -> impl Iterator<Item = (&KernelModule, &NagaModule)> {
        self.modules.iter().zip(&self.naga)
    }

    /// What the runtime creates, binds and dispatches to run the modules (made on demand,
    /// so that it always matches `plan` and `modules` as they are).
    pub fn launch(&self) -> Launch {
        launch(&self.plan, &self.modules)
    }

    /// Every module's WGSL, one after another (`--emit wgsl`).
    pub fn wgsl(&self) -> String {
        let texts: Vec<&str> = self.modules.iter().map(|m| m.wgsl.as_str()).collect();
        texts.join("\n")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Fuse(#[from] FuseError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Codegen(#[from] CodegenError),
}

/// Fuses `graph`, checks the plan with the plan verifier and generates naga-validated WGSL.
///
/// Where a kernel would loop past the target's limit or bind too many buffers, fusion runs
/// again: first without merging a layer's weight and bias updates (a merged kernel has several
/// roots, so it is never split into image chunks; apart, each can be, and binds fewer buffers),
/// then storing the windowed values (pool gradients) the kernel recomputes at every read —
/// a max pooling's gradient inlined into a weight gradient recomputes each window's maximum
/// per product.
pub fn compile(graph: &Graph, target: &Target) -> Result<Compiled, CompileError> {
    let mut merge = true;
    let mut stored: Vec<NodeId> = Vec::new();
    let (plan, modules) = loop {
        let plan = fuse_with(graph, target, merge, &stored)?;
        verify_plan(graph, &plan, target)?;
        let error = match emit_validated(graph, &plan, target) {
            Ok(modules) => break (plan, modules),
            Err(e) => e,
        };
        let (CodegenError::LoopLimit { kernel, .. } | CodegenError::BindingLimit { kernel, .. }) =
            &error
        else {
            return Err(error.into());
        };
        let Some(k) = plan.kernels.iter().find(|k| &k.name == kernel) else {
            return Err(error.into());
        };
        if merge && matches!(&k.kind, KernelKind::Map { roots } if roots.len() > 1) {
            merge = false;
            continue;
        }
        let recomputed: Vec<NodeId> = k
            .nodes
            .iter()
            .copied()
            .filter(|&n| {
                plan.placement[n.0] == Placement::Inline
                    && graph.node(n).op.pattern() == OpPattern::Window
                    && !stored.contains(&n)
            })
            .collect();
        if !matches!(error, CodegenError::LoopLimit { .. }) || recomputed.is_empty() {
            return Err(error.into());
        }
        stored.extend(recomputed);
    };
    let (modules, naga) = modules.into_iter().unzip();
    Ok(Compiled {
        graph: graph.clone(),
        plan,
        modules,
        naga,
    })
}
