//! The SSA graph: nodes in definition order, each naming its operands by earlier ids.

use std::fmt;

use crate::op::Op;
use crate::types::TensorType;

/// A node's position in its graph; printed as `%3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// The model layer a node was lowered from, for error messages and summaries
/// (`index` is the position in the `Sequential`, as in PyTorch).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LayerRef {
    pub index: usize,
    pub kind: String,
}

impl fmt::Display for LayerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {} ({})", self.index, self.kind)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub ty: TensorType,
    pub layer: Option<LayerRef>,
}

/// A named graph result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphOutput {
    pub name: String,
    pub node: NodeId,
}

/// A static-shape tensor graph in SSA form. Nodes can only refer to earlier nodes, so the node
/// order is a valid execution order. Construction infers and checks every type; [`crate::verify`]
/// re-checks all invariants of graphs built any other way (parsed, transformed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    pub name: String,
    pub(crate) nodes: Vec<Node>,
    pub(crate) outputs: Vec<GraphOutput>,
}

/// Why a node or output could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("{at}: {op}: {message}")]
    Type {
        /// `layer 7 (Linear)` when the node comes from a layer, otherwise the node id it would get.
        at: String,
        op: &'static str,
        message: String,
    },
    #[error("{kind} name `{name}` is used twice")]
    DuplicateName { kind: &'static str, name: String },
    #[error("{kind} name is empty")]
    EmptyName { kind: &'static str },
    #[error("{kind} name {name:?} contains a control character")]
    ControlCharacter { kind: &'static str, name: String },
    #[error("{0} does not exist")]
    UnknownNode(NodeId),
    #[error("type {ty} of {kind} `{name}` has too many elements")]
    TooLarge {
        kind: &'static str,
        name: String,
        ty: TensorType,
    },
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            nodes: Vec::new(),
            outputs: Vec::new(),
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.nodes[id.0].ty
    }

    pub fn outputs(&self) -> &[GraphOutput] {
        &self.outputs
    }

    /// Node ids paired with nodes, in definition order.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes.iter().enumerate().map(|(i, n)| (NodeId(i), n))
    }

    /// The graph's inputs as `(id, name, type)`, in definition order.
    pub fn inputs(&self) -> impl Iterator<Item = (NodeId, &str, &TensorType)> {
        self.iter().filter_map(|(id, n)| match &n.op {
            Op::Input { name } => Some((id, name.as_str(), &n.ty)),
            _ => None,
        })
    }

    /// The graph's parameters as `(id, name, type)`, in definition order.
    pub fn params(&self) -> impl Iterator<Item = (NodeId, &str, &TensorType)> {
        self.iter().filter_map(|(id, n)| match &n.op {
            Op::Param { name } => Some((id, name.as_str(), &n.ty)),
            _ => None,
        })
    }

    /// Total number of trainable scalars.
    pub fn param_count(&self) -> usize {
        self.params().map(|(_, _, t)| t.numel()).sum()
    }

    /// Looks up an output by name.
    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs.iter().find(|o| o.name == name).map(|o| o.node)
    }

    pub fn add_input(
        &mut self,
        name: impl Into<String>,
        ty: TensorType,
    ) -> Result<NodeId, GraphError> {
        self.add_leaf(Op::Input { name: name.into() }, ty, None)
    }

    pub fn add_param(
        &mut self,
        name: impl Into<String>,
        ty: TensorType,
        layer: Option<LayerRef>,
    ) -> Result<NodeId, GraphError> {
        self.add_leaf(Op::Param { name: name.into() }, ty, layer)
    }

    fn add_leaf(
        &mut self,
        op: Op,
        ty: TensorType,
        layer: Option<LayerRef>,
    ) -> Result<NodeId, GraphError> {
        let (kind, name) = match &op {
            Op::Input { name } => ("input", name),
            Op::Param { name } => ("param", name),
            _ => unreachable!("add_leaf is only called with leaves"),
        };
        if name.is_empty() {
            return Err(GraphError::EmptyName { kind });
        }
        if has_control(name) {
            return Err(GraphError::ControlCharacter {
                kind,
                name: name.clone(),
            });
        }
        if self
            .iter()
            .any(|(_, n)| n.op.name() == kind && leaf_name(&n.op) == Some(name))
        {
            return Err(GraphError::DuplicateName {
                kind,
                name: name.clone(),
            });
        }
        if ty.checked_numel().is_none() {
            return Err(GraphError::TooLarge {
                kind,
                name: name.clone(),
                ty,
            });
        }
        self.nodes.push(Node {
            op,
            inputs: vec![],
            ty,
            layer,
        });
        Ok(NodeId(self.nodes.len() - 1))
    }

    /// Appends an op, inferring its result type from its operands.
    pub fn add(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, GraphError> {
        self.add_in_layer(op, inputs, None)
    }

    /// Appends an op lowered from `layer`; type errors name the layer.
    pub fn add_in_layer(
        &mut self,
        op: Op,
        inputs: &[NodeId],
        layer: Option<LayerRef>,
    ) -> Result<NodeId, GraphError> {
        if let Some(&bad) = inputs.iter().find(|i| i.0 >= self.nodes.len()) {
            return Err(GraphError::UnknownNode(bad));
        }
        let at = match &layer {
            Some(l) => l.to_string(),
            None => format!("node {}", NodeId(self.nodes.len())),
        };
        if op.is_leaf() {
            return Err(GraphError::Type {
                at,
                op: op.name(),
                message: "use add_input/add_param for leaves".into(),
            });
        }
        let operand_types: Vec<&TensorType> = inputs.iter().map(|&i| self.ty(i)).collect();
        let ty = op
            .infer_type(&operand_types)
            .and_then(representable)
            .map_err(|message| GraphError::Type {
                at,
                op: op.name(),
                message,
            })?;
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            ty,
            layer,
        });
        Ok(NodeId(self.nodes.len() - 1))
    }

    /// Appends a copy of `node` from another graph, its operands renamed through `map` (old id
    /// to new id). Leaves keep their declared type; an op's type is inferred afresh, so a pass
    /// that changed an operand's type gets it checked.
    pub fn copy_node(&mut self, node: &Node, map: &[NodeId]) -> Result<NodeId, GraphError> {
        match &node.op {
            Op::Input { name } => self.add_input(name.clone(), node.ty.clone()),
            Op::Param { name } => self.add_param(name.clone(), node.ty.clone(), node.layer.clone()),
            op => {
                let inputs: Vec<NodeId> = node.inputs.iter().map(|i| map[i.0]).collect();
                self.add_in_layer(op.clone(), &inputs, node.layer.clone())
            }
        }
    }

    /// Marks `node` as a named result of the graph.
    pub fn add_output(&mut self, name: impl Into<String>, node: NodeId) -> Result<(), GraphError> {
        let name = name.into();
        if node.0 >= self.nodes.len() {
            return Err(GraphError::UnknownNode(node));
        }
        if name.is_empty() {
            return Err(GraphError::EmptyName { kind: "output" });
        }
        if has_control(&name) {
            return Err(GraphError::ControlCharacter {
                kind: "output",
                name,
            });
        }
        if self.outputs.iter().any(|o| o.name == name) {
            return Err(GraphError::DuplicateName {
                kind: "output",
                name,
            });
        }
        self.outputs.push(GraphOutput { name, node });
        Ok(())
    }

    /// Removes every output (nodes stay); for passes that rebuild the result set.
    pub fn clear_outputs(&mut self) {
        self.outputs.clear();
    }

    /// Builds a graph from parts without checking anything; for passes and the parser, which run
    /// [`crate::verify`] on the result.
    pub fn from_parts(name: String, nodes: Vec<Node>, outputs: Vec<GraphOutput>) -> Self {
        Graph {
            name,
            nodes,
            outputs,
        }
    }
}

/// `ty` when its element count fits `usize`: an op's result can overflow even where its
/// operands do not (`matmul` of `[M,0]` and `[0,N]`, a `gather` of `[0,...]` rows), and every
/// type in a graph must be representable.
pub(crate) fn representable(ty: TensorType) -> Result<TensorType, String> {
    match ty.checked_numel() {
        Some(_) => Ok(ty),
        None => Err(format!("result type {ty} has too many elements")),
    }
}

/// Names end up in generated code comments, file names and terminal output, where a line
/// break or other control character would change what they mean (a name could end a WGSL
/// comment and inject code), so names may not contain any (nor WGSL's other line breaks,
/// U+2028 and U+2029).
pub(crate) fn has_control(name: &str) -> bool {
    name.chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
}

pub(crate) fn leaf_name(op: &Op) -> Option<&String> {
    match op {
        Op::Input { name } | Op::Param { name } => Some(name),
        _ => None,
    }
}
