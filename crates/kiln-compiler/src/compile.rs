//! The whole back half as one function: graph in, verified plan and validated WGSL (with its
//! naga IR) out.

use kiln_ir::Graph;

use crate::plan::{FuseError, KernelKind, Plan, fuse_with};
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
pub fn compile(graph: &Graph, target: &Target) -> Result<Compiled, CompileError> {
    let plan = fuse_with(graph, target, true)?;
    verify_plan(graph, &plan, target)?;
    let (plan, modules) = match emit_validated(graph, &plan, target) {
        // A layer's merged weight and bias updates are one kernel of several roots, which is
        // never split into image chunks; apart, each can be, and fit the loop limit. Apart,
        // each also binds fewer buffers where chunking added its tables and running sums.
        Err(CodegenError::LoopLimit { kernel, .. } | CodegenError::BindingLimit { kernel, .. })
            if plan.kernels.iter().any(|k| {
                k.name == kernel && matches!(&k.kind, KernelKind::Map { roots } if roots.len() > 1)
            }) =>
        {
            let plan = fuse_with(graph, target, false)?;
            verify_plan(graph, &plan, target)?;
            let modules = emit_validated(graph, &plan, target)?;
            (plan, modules)
        }
        other => (plan, other?),
    };
    let (modules, naga) = modules.into_iter().unzip();
    Ok(Compiled {
        graph: graph.clone(),
        plan,
        modules,
        naga,
    })
}
