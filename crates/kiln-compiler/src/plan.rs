//! Fusion: partitions a graph into kernels and orders them.
//!
//! Every non-leaf node is placed:
//! - **stored** — written to a buffer by the kernel whose *root* it is. Graph outputs, values
//!   that several kernels need and are expensive to recompute, and anything forced by limits.
//! - **inline** — computed on the fly inside each kernel that reads it. Cheap ops (elementwise,
//!   injective, pooling windows, pool gradients; TVM's injective/broadcast patterns) are always
//!   inlined into their readers — recomputed, never stored — as long as one element costs at
//!   most [`MAX_INLINE_READS`] reads. This is how the batch gather lands in the reads of the
//!   kernel that scales the batch, and pool-gradient upsampling and activation derivatives land
//!   in the reads of the kernels that consume them (XLA's input fusion). One exception, chosen
//!   by profiling on lavapipe: a cheap value that *computes* something (not a plain data read)
//!   and that a convolution or matmul would re-read [`MAX_INLINE_REUSE`] or more times per
//!   element (directly or through reshapes: a flattened input of a linear layer) is stored
//!   once by its own kernel instead (the upsampled, activation-differentiated
//!   gradient that a convolution's input- and weight-gradient kernels both sweep hundreds of
//!   times): recomputing it inside the reduction loops cost 2-3x their time. The u8 scaling of
//!   the batch counts as computing: the first convolution reads each pixel 150 times, and
//!   unpacking a gathered u8 each time made its forward kernel 2.3x and its weight gradient
//!   1.5x slower than reading a stored f32 batch (measured with `--profile`, register-blocked).
//! - Expensive ops (*anchors*: convolutions and their gradients, matmul, reductions, softmax
//!   cross-entropy and its gradient, argmax, count) are inlined only into a single consumer that
//!   reads each of their elements exactly once (elementwise, reshape, a pooling whose windows
//!   tile the input, a reduction): the epilogue fusion of conv + bias + activation + pool,
//!   matmul + bias + activation, and weight gradient + SGD update (XLA's loop/output fusion).
//! - **side output** — an expensive value several kernels need, computed inside the kernel of
//!   the one consumer that reads it exactly once, and stored as that kernel reads it (the
//!   sigmoid output that the pooled conv kernel passes through, which backward needs). Saving
//!   it costs one store per element; recomputing it would cost a whole convolution.
//!
//! A logits node read only by softmax cross-entropy (summed over the batch), argmax (counted
//! against labels) and the cross-entropy gradient becomes one *classifier head* kernel that
//! writes the loss sum, the correct count and the logits gradient; not where the per-example
//! loss or the argmax is stored itself (an output), which the head keeps in registers only.
//!
//! Parameter updates (an output named like a parameter) are written in place into the
//! parameter's buffer, after every kernel that reads the old value. An optimizer's state is
//! such a parameter too; a state update that only the parameter's update reads (a momentum
//! buffer, Adam's moments) is a side output of the parameter's update kernel, so a parameter
//! and its state are updated by one kernel. A gradient that the update reads more than once
//! (Adam's `m` and `v` both read it) is stored by its own kernel instead of being recomputed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

use kiln_ir::{DType, Graph, NodeId, Op, OpPattern, TensorType, VerifyError, verify};

use crate::target::Target;

/// Most reads one element of an inlined cheap value may cost before it is stored instead.
pub const MAX_INLINE_READS: usize = 64;

/// Largest class count the classifier head keeps in registers.
pub const MAX_HEAD_CLASSES: usize = 64;

/// Where a node's value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// An input or parameter: a buffer filled by the caller.
    Leaf,
    /// Computed inside each kernel that reads it.
    Inline,
    /// Stored by the kernel it is the root of.
    Stored,
    /// Computed inside the kernel of `consumer` and stored as it is read there.
    Side { consumer: NodeId },
}

/// The ops of a classifier head kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Logits `f32[N,C]`, computed per row in registers.
    pub logits: NodeId,
    /// `softmax_cross_entropy` and the `reduce_sum` over the batch it feeds.
    pub loss: Option<(NodeId, NodeId)>,
    /// `argmax` and the `count_equal` it feeds.
    pub correct: Option<(NodeId, NodeId)>,
    /// `softmax_cross_entropy_grad` of the logits.
    pub grad: Option<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// One invocation per element of the largest root; each root is computed by the
    /// invocations below its size (several roots: independent updates of one layer).
    Map { roots: Vec<NodeId> },
    /// One workgroup looping over the rows of a classifier head.
    Head(Head),
}

/// One GPU kernel: the nodes it computes, what it reads and what it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub name: String,
    pub kind: KernelKind,
    /// Every node computed here, in definition order.
    pub nodes: Vec<NodeId>,
    /// Nodes whose values this kernel writes to their buffers.
    pub stores: Vec<NodeId>,
    /// Leaves and stored nodes this kernel reads from buffers.
    pub reads: Vec<NodeId>,
    /// Nodes computed here that other kernels compute too (cheap, recomputed on purpose).
    pub recomputed: Vec<NodeId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferKind {
    Input,
    Param,
    Intermediate,
    Output,
}

/// A device buffer. u8 inputs are packed four to a word; every other element is one 32-bit
/// word (u8 values a kernel writes are widened to u32).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub name: String,
    pub ty: TensorType,
    pub kind: BufferKind,
    pub packed_u8: bool,
}

impl Buffer {
    /// Size in bytes: whole 16-byte rows (so any buffer can be bound as a uniform array of
    /// `vec4`s), at least one (wgpu does not bind empty buffers).
    pub fn bytes(&self) -> u64 {
        let n = self.ty.numel() as u64;
        let words = if self.packed_u8 { n.div_ceil(4) } else { n };
        words.max(1).div_ceil(4) * 16
    }
}

/// The fused, ordered kernels of one graph and the buffers they share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub graph: String,
    /// Kernels in execution order.
    pub kernels: Vec<Kernel>,
    pub buffers: Vec<Buffer>,
    /// Per node: its buffer, for leaves and stored nodes.
    pub buffer_of: Vec<Option<usize>>,
    pub placement: Vec<Placement>,
    /// Parameter updates written in place: `(update node, parameter node)`.
    pub updates: Vec<(NodeId, NodeId)>,
}

impl Plan {
    pub fn buffer(&self, node: NodeId) -> Option<&Buffer> {
        self.buffer_of[node.0].map(|b| &self.buffers[b])
    }

    /// The kernel that stores `node`, if any.
    pub fn producer(&self, node: NodeId) -> Option<usize> {
        self.kernels.iter().position(|k| k.stores.contains(&node))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FuseError {
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    #[error(
        "kernel {kernel} needs {needed} storage buffers but the device allows {limit} \
         (max_storage_buffers_per_shader_stage), and it cannot be split further"
    )]
    TooManyBuffers {
        kernel: String,
        needed: usize,
        limit: u32,
    },
    #[error("{0}")]
    Schedule(String),
}

/// Whether `op` is expensive enough to be worth storing rather than recomputing: a
/// reduction or an anchor ([`OpPattern`]).
pub fn is_anchor(op: &Op) -> bool {
    matches!(op.pattern(), OpPattern::Reduction | OpPattern::Anchor)
}

/// Whether the op can carry an anchor's epilogue (it reads its first operand elementwise).
fn is_epilogue(op: &Op) -> bool {
    !is_anchor(op) && !op.is_leaf()
}

/// Whether `consumer` reads every element of its operand `k` exactly once over its whole domain.
fn reads_once(graph: &Graph, consumer: NodeId, k: usize) -> bool {
    let node = graph.node(consumer);
    match node.op.pattern() {
        OpPattern::Elementwise => true,
        // The broadcast operands are read once per element of the axes they lack.
        OpPattern::Broadcast => k == 0,
        // A gather picks rows (some twice, some never), a broadcast repeats.
        OpPattern::Injective => matches!(node.op, Op::Reshape { .. }),
        // Windows that tile their input: pools only (a pool gradient reads a window per
        // output element).
        OpPattern::Window => match &node.op {
            Op::AvgPool2d { kernel, stride } | Op::MaxPool2d { kernel, stride } => {
                let x = &graph.ty(node.inputs[0]).shape;
                kernel == stride && x[2] % kernel[0] == 0 && x[3] % kernel[1] == 0
            }
            _ => false,
        },
        // A full reduction reads each element once; a row's softmax or argmax reads it
        // several times.
        OpPattern::Reduction => matches!(
            node.op,
            Op::ReduceSum { .. } | Op::ReduceMean { .. } | Op::CountEqual
        ),
        OpPattern::Anchor | OpPattern::Leaf | OpPattern::Constant => false,
    }
}

/// Reads of operand `k` per output element of a cheap op (for the inline cost bound).
fn reads_per_element(op: &Op, k: usize) -> usize {
    let windows = |kernel: &[usize; 2], stride: &[usize; 2]| {
        kernel[0].div_ceil(stride[0]) * kernel[1].div_ceil(stride[1])
    };
    match op {
        Op::AvgPool2d { kernel, .. } | Op::MaxPool2d { kernel, .. } => kernel[0] * kernel[1],
        Op::AvgPool2dGrad { kernel, stride, .. } => windows(kernel, stride),
        Op::MaxPool2dGrad { kernel, stride } => {
            let w = windows(kernel, stride);
            if k == 0 { w * kernel[0] * kernel[1] } else { w }
        }
        _ => 1,
    }
}

/// How many times an anchor reads each element of its operand `k`, on average over its domain.
fn reuse(graph: &Graph, consumer: NodeId, k: usize) -> usize {
    let node = graph.node(consumer);
    let out = node.ty.numel();
    let operand = graph.ty(node.inputs[k]).numel().max(1);
    let per_output = match &node.op {
        Op::Conv2d { .. } => {
            let w = &graph.ty(node.inputs[1]).shape;
            w[1] * w[2] * w[3]
        }
        Op::Conv2dGradInput { .. } => {
            let w = &graph.ty(node.inputs[1]).shape;
            w[0] * w[2] * w[3]
        }
        Op::Conv2dGradWeight { .. } => {
            let dy = &graph.ty(node.inputs[1]).shape;
            dy[0] * dy[2] * dy[3]
        }
        Op::MatMul { transpose_a, .. } => {
            let a = &graph.ty(node.inputs[0]).shape;
            if *transpose_a { a[0] } else { a[1] }
        }
        _ => return 1,
    };
    out.saturating_mul(per_output) / operand
}

/// Anchors that read an operand this many times per element get it stored, unless it is a
/// plain data read (gather, u8 scaling, reshape, constants).
pub const MAX_INLINE_REUSE: usize = 8;

/// Whether an anchor reads `id` [`MAX_INLINE_REUSE`] or more times per element, directly or
/// through reshapes (a flatten between the u8 scaling or an activation and a linear layer
/// hides no reuse: the matmul re-read the gathered, scaled pixel once per output feature).
fn reread_by_anchor(graph: &Graph, consumers: &Consumers, id: NodeId) -> bool {
    consumers[id.0]
        .iter()
        .any(|&(c, k)| match graph.node(c).op {
            Op::Reshape { .. } => reread_by_anchor(graph, consumers, c),
            ref op => is_anchor(op) && reuse(graph, c, k) >= MAX_INLINE_REUSE,
        })
}

/// Whether inlining `id` recomputes real work (pool gradients, activation derivatives) rather
/// than just reading data.
fn computes(graph: &Graph, id: NodeId) -> bool {
    !matches!(
        graph.node(id).op.pattern(),
        OpPattern::Injective | OpPattern::Constant
    )
}

/// Whether every node of `nodes` computed from `leaf` (directly or through other such nodes)
/// is a pointwise op of the leaf's shape: then element `j` of anything the kernel computes
/// from the leaf reads element `j` of it only, and writing the leaf's update in place, each
/// invocation its own elements, cannot clobber a value another invocation still reads.
pub(crate) fn reads_elementwise(graph: &Graph, nodes: &[NodeId], leaf: NodeId) -> bool {
    let shape = &graph.ty(leaf).shape;
    let mut from_leaf: HashSet<NodeId> = HashSet::from([leaf]);
    let mut ordered = nodes.to_vec();
    ordered.sort();
    for n in ordered {
        let node = graph.node(n);
        if node.inputs.iter().any(|i| from_leaf.contains(i)) {
            if !node.op.is_elementwise() || node.ty.shape != *shape {
                return false;
            }
            from_leaf.insert(n);
        }
    }
    true
}

/// Where a value read by one chain of single readers ends: the first node with no reader or
/// several (a parameter update, for the ops of an optimizer).
fn sink(consumers: &Consumers, mut id: NodeId) -> NodeId {
    while let [(c, _)] = consumers[id.0].as_slice() {
        id = *c;
    }
    id
}

/// Expensive values read more than once by a chain of ops that ends in one place (Adam's
/// moments both read the gradient, and both end in the parameter's update; Nesterov momentum
/// reads the decayed gradient twice): one kernel would compute the value once per read, so it
/// is stored. Expensive: an anchor, or an op over one whose only reader it is (inlined there).
fn reread_by_one_chain(graph: &Graph, consumers: &Consumers) -> Vec<NodeId> {
    let mut heavy = vec![false; graph.nodes().len()];
    for (id, node) in graph.iter() {
        heavy[id.0] = is_anchor(&node.op)
            || (!node.op.is_leaf()
                && node
                    .inputs
                    .iter()
                    .any(|i| heavy[i.0] && consumers[i.0].len() == 1));
    }
    graph
        .iter()
        .filter(|(id, _)| {
            let cons = &consumers[id.0];
            heavy[id.0] && cons.len() > 1 && {
                let first = sink(consumers, cons[0].0);
                cons.iter().all(|&(c, _)| sink(consumers, c) == first)
            }
        })
        .map(|(id, _)| id)
        .collect()
}

/// Every node's readers, as `(reader, operand position)`, in definition order.
type Consumers = Vec<Vec<(NodeId, usize)>>;

fn consumers_of(graph: &Graph) -> Consumers {
    let mut consumers: Consumers = vec![Vec::new(); graph.nodes().len()];
    for (id, node) in graph.iter() {
        for (k, i) in node.inputs.iter().enumerate() {
            consumers[i.0].push((id, k));
        }
    }
    consumers
}

/// Places every node (see the module docs). `forced` nodes are stored regardless.
fn place(
    graph: &Graph,
    consumers: &Consumers,
    forced: &HashSet<NodeId>,
    allow_side: bool,
    updates: &[(NodeId, NodeId)],
) -> Vec<Placement> {
    let n = graph.nodes().len();
    let mut is_output = vec![false; n];
    for o in graph.outputs() {
        is_output[o.node.0] = true;
    }
    let mut placement = vec![Placement::Leaf; n];
    let mut heavy = vec![false; n];
    let mut cost = vec![1usize; n];
    for (id, node) in graph.iter() {
        if node.op.is_leaf() {
            continue;
        }
        let computed_here = |i: &NodeId| match placement[i.0] {
            Placement::Inline => true,
            Placement::Side { consumer } => consumer == id,
            _ => false,
        };
        heavy[id.0] =
            is_anchor(&node.op) || node.inputs.iter().any(|i| computed_here(i) && heavy[i.0]);
        cost[id.0] = 1 + node
            .inputs
            .iter()
            .enumerate()
            .map(|(k, i)| {
                let per = if computed_here(i) { cost[i.0] } else { 1 };
                reads_per_element(&node.op, k).saturating_mul(per)
            })
            .sum::<usize>();
        let cons = &consumers[id.0];
        // An optimizer state's update read by one elementwise op (on its way to the
        // parameter's update): computed and saved where that op reads it.
        let state_update = match cons.as_slice() {
            [(c, k)]
                if allow_side
                    && !forced.contains(&id)
                    && updates.iter().any(|(u, _)| *u == id)
                    && reads_once(graph, *c, *k)
                    && is_epilogue(&graph.node(*c).op) =>
            {
                Some(*c)
            }
            _ => None,
        };
        placement[id.0] = if let Some(consumer) = state_update {
            Placement::Side { consumer }
        } else if is_output[id.0] || forced.contains(&id) || cons.is_empty() {
            Placement::Stored
        } else if !heavy[id.0] {
            let reread = computes(graph, id) && reread_by_anchor(graph, consumers, id);
            if cost[id.0] <= MAX_INLINE_READS && !reread {
                Placement::Inline
            } else {
                Placement::Stored
            }
        } else if cons.len() == 1 && reads_once(graph, cons[0].0, cons[0].1) {
            Placement::Inline
        } else {
            // The first reader (the forward epilogue, in a step graph) carries the value and
            // saves it for the others.
            let (first, k) = cons[0];
            let distinct: BTreeSet<NodeId> = cons.iter().map(|(c, _)| *c).collect();
            if allow_side
                && distinct.len() == cons.len()
                && reads_once(graph, first, k)
                && is_epilogue(&graph.node(first).op)
            {
                Placement::Side { consumer: first }
            } else {
                Placement::Stored
            }
        };
    }
    placement
}

/// The nodes a kernel rooted at `roots` computes, and the nodes it reads from buffers.
fn closure(graph: &Graph, placement: &[Placement], roots: &[NodeId]) -> (Vec<NodeId>, Vec<NodeId>) {
    let mut nodes = BTreeSet::new();
    let mut reads = BTreeSet::new();
    let mut stack: Vec<NodeId> = roots.to_vec();
    while let Some(id) = stack.pop() {
        if !nodes.insert(id) {
            continue;
        }
        for &i in &graph.node(id).inputs {
            let here = match placement[i.0] {
                Placement::Inline => true,
                Placement::Side { consumer } => consumer == id,
                _ => false,
            };
            if here {
                stack.push(i);
            } else {
                reads.insert(i);
            }
        }
    }
    (nodes.into_iter().collect(), reads.into_iter().collect())
}

/// The matrix product computed inside `head`'s logits, if the head's rows would run more loop
/// iterations per invocation than the target allows: one workgroup (of up to 1,024
/// invocations) loops over the rows, and each row multiplies `classes x inputs` (a wide last
/// layer: a flatten of 9,408 features into 10 logits is 94,080 per row). Half the limit
/// leaves room for the head's own loops; `None` without a limit.
fn wide_head_matmul(
    graph: &Graph,
    placement: &[Placement],
    head: &Head,
    target: &Target,
) -> Option<NodeId> {
    let limit = target.max_loop_iterations?;
    let ty = graph.ty(head.logits);
    let rows = ty.shape[0].div_ceil(target.max_workgroup_size_x.clamp(1, 1024) as usize) as u64;
    let mut stack = vec![head.logits];
    let mut seen = HashSet::new();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let node = graph.node(id);
        if matches!(node.op, Op::MatMul { .. }) {
            let work = graph.ty(node.inputs[1]).numel() as u64;
            if rows.saturating_mul(work) > limit / 2 {
                return Some(id);
            }
        }
        stack.extend(
            node.inputs
                .iter()
                .filter(|i| placement[i.0] == Placement::Inline)
                .copied(),
        );
    }
    None
}

/// Finds classifier heads among the stored nodes (see the module docs).
fn find_heads(graph: &Graph, consumers: &Consumers, placement: &[Placement]) -> Vec<Head> {
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|o| o.node).collect();
    let single = |id: NodeId| match consumers[id.0].as_slice() {
        [(c, _)] => Some(*c),
        _ => None,
    };
    let mut heads = Vec::new();
    for (id, node) in graph.iter() {
        let ty = &node.ty;
        if placement[id.0] != Placement::Stored
            || outputs.contains(&id)
            || ty.dtype != DType::F32
            || ty.rank() != 2
            || ty.shape[1] == 0
            || ty.shape[1] > MAX_HEAD_CLASSES
        {
            continue;
        }
        let mut head = Head {
            logits: id,
            loss: None,
            correct: None,
            grad: None,
        };
        let mut ok = !consumers[id.0].is_empty();
        for &(c, k) in &consumers[id.0] {
            let op = &graph.node(c).op;
            ok &= k == 0;
            match op {
                // The loss rows and the argmax live in the head's registers only: one that is
                // stored itself (an output) leaves the logits to kernels of their own.
                Op::SoftmaxCrossEntropy | Op::Argmax if placement[c.0] == Placement::Stored => {
                    ok = false;
                }
                Op::SoftmaxCrossEntropy if head.loss.is_none() => match single(c) {
                    Some(r)
                        if graph.node(r).op == (Op::ReduceSum { axes: vec![0] })
                            && placement[r.0] == Placement::Stored =>
                    {
                        head.loss = Some((c, r))
                    }
                    _ => ok = false,
                },
                Op::Argmax if head.correct.is_none() => match single(c) {
                    Some(r)
                        if graph.node(r).op == Op::CountEqual
                            && placement[r.0] == Placement::Stored
                            && graph.node(r).inputs[1] != c =>
                    {
                        head.correct = Some((c, r))
                    }
                    _ => ok = false,
                },
                Op::SoftmaxCrossEntropyGrad if head.grad.is_none() => {
                    ok &= placement[c.0] == Placement::Stored;
                    head.grad = Some(c);
                }
                _ => ok = false,
            }
        }
        if ok {
            heads.push(head);
        }
    }
    heads
}

fn kernel_label(graph: &Graph, plan_updates: &[(NodeId, NodeId)], kind: &KernelKind) -> String {
    match kind {
        KernelKind::Head(_) => "classifier_head".into(),
        KernelKind::Map { roots } => {
            let root = &roots[0];
            if let Some((_, p)) = plan_updates.iter().find(|(u, _)| u == root) {
                if let Op::Param { name } = &graph.node(*p).op {
                    if roots.len() > 1 {
                        if let Some(l) = &graph.node(*root).layer {
                            return format!("update_layer{}", l.index);
                        }
                    }
                    return format!("update_{name}");
                }
            }
            let node = graph.node(*root);
            match &node.layer {
                Some(l) => format!("{}_l{}", node.op.name(), l.index),
                None => node.op.name().to_string(),
            }
        }
    }
}

/// Parameter updates: outputs named like a parameter, of its type, computed by some op.
fn find_updates(graph: &Graph) -> Vec<(NodeId, NodeId)> {
    let params: HashMap<&str, (NodeId, &TensorType)> =
        graph.params().map(|(id, n, t)| (n, (id, t))).collect();
    graph
        .outputs()
        .iter()
        .filter_map(|o| {
            let (p, ty) = params.get(o.name.as_str())?;
            (o.node != *p && graph.ty(o.node) == *ty && !graph.node(o.node).op.is_leaf())
                .then_some((o.node, *p))
        })
        .collect()
}

/// Partitions `graph` into kernels and orders them. The result satisfies [`crate::verify_plan`].
pub fn fuse(graph: &Graph, target: &Target) -> Result<Plan, FuseError> {
    fuse_with(graph, target, true, &[])
}

/// [`fuse`], merging each layer's weight and bias updates into one kernel only when
/// `merge_updates` is set, and storing the nodes of `stored` whatever the rules say. A merged
/// kernel has several roots and so is never split into image chunks; [`crate::compile`] fuses
/// again without merging when one would loop too long, and then storing what the kernel
/// recomputes per read.
pub(crate) fn fuse_with(
    graph: &Graph,
    target: &Target,
    merge_updates: bool,
    stored: &[NodeId],
) -> Result<Plan, FuseError> {
    verify(graph)?;
    let updates = find_updates(graph);
    let consumers = consumers_of(graph);
    let mut forced: HashSet<NodeId> = reread_by_one_chain(graph, &consumers).into_iter().collect();
    forced.extend(
        stored
            .iter()
            .copied()
            .filter(|n| !graph.node(*n).op.is_leaf()),
    );
    let mut allow_side = true;
    let mut no_head: HashSet<NodeId> = HashSet::new();
    loop {
        let mut placement = place(graph, &consumers, &forced, allow_side, &updates);
        let mut heads = find_heads(graph, &consumers, &placement);
        heads.retain(|h| !no_head.contains(&h.logits));
        // A head whose rows would loop past the device's limit computes its logits from a
        // stored matrix product instead of multiplying in its own loop.
        // The logits stay stored, so that the head is found again around them.
        let wide: Vec<NodeId> = heads
            .iter()
            .filter_map(|h| wide_head_matmul(graph, &placement, h, target).map(|m| [m, h.logits]))
            .flatten()
            .collect();
        if !wide.is_empty() {
            forced.extend(wide);
            continue;
        }
        for head in &heads {
            // The head computes its logits row by row in registers; nothing else reads them.
            placement[head.logits.0] = Placement::Inline;
        }
        let mut in_head: HashMap<NodeId, usize> = HashMap::new();
        for (h, head) in heads.iter().enumerate() {
            for id in [head.loss.map(|l| l.1), head.correct.map(|c| c.1), head.grad]
                .into_iter()
                .flatten()
            {
                in_head.insert(id, h);
            }
        }
        // One kernel per stored node, heads merged.
        let mut kernels: Vec<Kernel> = Vec::new();
        let mut head_done = vec![false; heads.len()];
        for (id, _) in graph.iter() {
            if placement[id.0] != Placement::Stored {
                continue;
            }
            let (kind, roots, stores) = match in_head.get(&id) {
                Some(&h) => {
                    if head_done[h] {
                        continue;
                    }
                    head_done[h] = true;
                    let head = &heads[h];
                    let stores: Vec<NodeId> =
                        [head.loss.map(|l| l.1), head.correct.map(|c| c.1), head.grad]
                            .into_iter()
                            .flatten()
                            .collect();
                    let mut roots = stores.clone();
                    roots.push(head.logits);
                    (KernelKind::Head(head.clone()), roots, stores)
                }
                None => (KernelKind::Map { roots: vec![id] }, vec![id], vec![id]),
            };
            let (nodes, reads) = closure(graph, &placement, &roots);
            let mut stores = stores;
            stores.extend(
                nodes
                    .iter()
                    .filter(|n| matches!(placement[n.0], Placement::Side { .. })),
            );
            stores.sort();
            stores.dedup();
            kernels.push(Kernel {
                name: String::new(),
                kind,
                nodes,
                stores,
                reads,
                recomputed: Vec::new(),
            });
        }
        let mut kernels = if merge_updates {
            merge_layer_updates(
                graph,
                kernels,
                &updates,
                target.max_storage_buffers_per_stage as usize,
            )
        } else {
            kernels
        };
        // Cheap nodes that several kernels compute.
        let mut count: HashMap<NodeId, usize> = HashMap::new();
        for k in &kernels {
            for n in &k.nodes {
                *count.entry(*n).or_default() += 1;
            }
        }
        for k in &mut kernels {
            k.recomputed = k.nodes.iter().copied().filter(|n| count[n] > 1).collect();
        }
        // In-place updates need the update kernel to read its parameter only where it writes
        // (see `reads_elementwise`); otherwise what the update subtracts is stored first.
        let mut retry = false;
        for &(u, p) in &updates {
            if let Some(k) = kernels.iter().find(|k| k.stores.contains(&u)) {
                if !reads_elementwise(graph, &k.nodes, p) {
                    let node = graph.node(u);
                    let operands: Vec<NodeId> = match node.op {
                        Op::Sub if node.inputs[0] == p => vec![node.inputs[1]],
                        _ => node.inputs.clone(),
                    };
                    for o in operands {
                        if !graph.node(o).op.is_leaf() && forced.insert(o) {
                            retry = true;
                        }
                    }
                }
            }
        }
        if retry {
            continue;
        }
        // Binding limit: store the inlined operand that brings in the most buffers.
        let buffers_of = |k: &Kernel| binding_count(k, &updates);
        let limit = target.max_storage_buffers_per_stage as usize;
        if let Some(k) = kernels.iter().find(|k| buffers_of(k) > limit) {
            if let KernelKind::Head(h) = &k.kind {
                // Too wide for one kernel here: fall back to the generic kernels.
                no_head.insert(h.logits);
                continue;
            }
            let candidate = k
                .nodes
                .iter()
                .filter(|n| !k.stores.contains(n) && !forced.contains(n))
                .max_by_key(|n| closure(graph, &placement, &[**n]).1.len());
            match candidate {
                Some(&n) => {
                    forced.insert(n);
                    continue;
                }
                None => {
                    return Err(FuseError::TooManyBuffers {
                        kernel: kernel_label(graph, &updates, &k.kind),
                        needed: buffers_of(k),
                        limit: target.max_storage_buffers_per_stage,
                    });
                }
            }
        }
        match schedule(graph, &kernels, &updates) {
            Ok(order) => {
                let mut ordered: Vec<Kernel> =
                    order.into_iter().map(|i| kernels[i].clone()).collect();
                for (i, k) in ordered.iter_mut().enumerate() {
                    k.name = format!("k{i:02}_{}", kernel_label(graph, &updates, &k.kind));
                }
                let (buffers, buffer_of) = assign_buffers(graph, &placement, &updates);
                return Ok(Plan {
                    graph: graph.name.clone(),
                    kernels: ordered,
                    buffers,
                    buffer_of,
                    placement,
                    updates,
                });
            }
            Err(_) if allow_side => allow_side = false,
            Err(e) => {
                // Updates that read each other's parameters through their fused gradients
                // (two parameters multiplied together): store what each update subtracts,
                // so that every gradient is computed from the old values before any update.
                let mut more = false;
                for &(u, p) in &updates {
                    let node = graph.node(u);
                    for &o in &node.inputs {
                        if o != p && !graph.node(o).op.is_leaf() && forced.insert(o) {
                            more = true;
                        }
                    }
                }
                if !more {
                    return Err(FuseError::Schedule(e));
                }
                allow_side = true;
            }
        }
    }
}

/// Distinct buffers a kernel binds (an in-place update binds its parameter's buffer).
fn binding_count(k: &Kernel, updates: &[(NodeId, NodeId)]) -> usize {
    let mut b: BTreeSet<NodeId> = k.reads.iter().copied().collect();
    for s in &k.stores {
        let alias = updates.iter().find(|(u, _)| u == s).map(|(_, p)| *p);
        b.insert(alias.unwrap_or(*s));
    }
    b.len()
}

/// Horizontal fusion: the parameter updates of one layer (weight and bias) become one kernel
/// when it fits the binding limit. They read the same gradients and depend on nothing the
/// other writes.
fn merge_layer_updates(
    graph: &Graph,
    kernels: Vec<Kernel>,
    updates: &[(NodeId, NodeId)],
    limit: usize,
) -> Vec<Kernel> {
    let layer_of_update = |k: &Kernel| match &k.kind {
        KernelKind::Map { roots }
            if roots.len() == 1 && updates.iter().any(|(u, _)| *u == roots[0]) =>
        {
            graph.node(roots[0]).layer.as_ref().map(|l| l.index)
        }
        _ => None,
    };
    let mut out: Vec<Kernel> = Vec::new();
    for k in kernels {
        let layer = layer_of_update(&k);
        let target = layer.and_then(|l| {
            out.iter().position(|o| match &o.kind {
                KernelKind::Map { roots } => {
                    updates.iter().any(|(u, _)| *u == roots[0])
                        && graph.node(roots[0]).layer.as_ref().map(|x| x.index) == Some(l)
                }
                _ => false,
            })
        });
        let Some(t) = target else {
            out.push(k);
            continue;
        };
        let mut merged = out[t].clone();
        let KernelKind::Map { roots } = &mut merged.kind else {
            unreachable!("matched a map above")
        };
        let KernelKind::Map { roots: more } = &k.kind else {
            unreachable!("updates are maps")
        };
        roots.extend(more.iter().copied());
        let nodes: BTreeSet<NodeId> = merged.nodes.iter().chain(&k.nodes).copied().collect();
        let reads: BTreeSet<NodeId> = merged
            .reads
            .iter()
            .chain(&k.reads)
            .copied()
            .filter(|r| !nodes.contains(r))
            .collect();
        merged.nodes = nodes.into_iter().collect();
        merged.reads = reads.into_iter().collect();
        merged.stores.extend(k.stores.iter().copied());
        merged.stores.sort();
        if binding_count(&merged, updates) <= limit {
            out[t] = merged;
        } else {
            out.push(k);
        }
    }
    out
}

/// Orders kernels so every stored value is written before it is read, and every kernel that
/// reads a parameter's old value runs before the kernel updating it in place. Ties keep
/// definition order.
fn schedule(
    graph: &Graph,
    kernels: &[Kernel],
    updates: &[(NodeId, NodeId)],
) -> Result<Vec<usize>, String> {
    let producer: HashMap<NodeId, usize> = kernels
        .iter()
        .enumerate()
        .flat_map(|(k, kern)| kern.stores.iter().map(move |s| (*s, k)))
        .collect();
    let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); kernels.len()];
    for (k, kern) in kernels.iter().enumerate() {
        for r in &kern.reads {
            if let Some(&p) = producer.get(r) {
                if p != k {
                    edges[p].insert(k);
                }
            }
        }
    }
    for &(u, p) in updates {
        let Some(&uk) = producer.get(&u) else {
            continue;
        };
        for (k, kern) in kernels.iter().enumerate() {
            if k != uk && kern.reads.contains(&p) {
                edges[k].insert(uk);
            }
        }
    }
    let mut indegree = vec![0usize; kernels.len()];
    for e in &edges {
        for &t in e {
            indegree[t] += 1;
        }
    }
    let key = |k: usize| kernels[k].stores.first().map_or(0, |n| n.0);
    let mut ready: BinaryHeap<Reverse<(usize, usize)>> = (0..kernels.len())
        .filter(|&k| indegree[k] == 0)
        .map(|k| Reverse((key(k), k)))
        .collect();
    let mut order = Vec::with_capacity(kernels.len());
    while let Some(Reverse((_, k))) = ready.pop() {
        order.push(k);
        for &t in &edges[k] {
            indegree[t] -= 1;
            if indegree[t] == 0 {
                ready.push(Reverse((key(t), t)));
            }
        }
    }
    if order.len() == kernels.len() {
        Ok(order)
    } else {
        Err(format!(
            "graph `{}`: kernels cannot be ordered: a parameter is updated in place while \
             another kernel still needs its old value",
            graph.name
        ))
    }
}

fn assign_buffers(
    graph: &Graph,
    placement: &[Placement],
    updates: &[(NodeId, NodeId)],
) -> (Vec<Buffer>, Vec<Option<usize>>) {
    let mut buffers = Vec::new();
    let mut buffer_of = vec![None; graph.nodes().len()];
    let output_name: HashMap<NodeId, &str> = graph
        .outputs()
        .iter()
        .map(|o| (o.node, o.name.as_str()))
        .collect();
    for (id, node) in graph.iter() {
        let (name, kind) = match (&node.op, placement[id.0]) {
            (Op::Input { name }, _) => (name.clone(), BufferKind::Input),
            (Op::Param { name }, _) => (name.clone(), BufferKind::Param),
            (_, Placement::Stored | Placement::Side { .. }) => {
                if let Some((_, p)) = updates.iter().find(|(u, _)| *u == id) {
                    buffer_of[id.0] = buffer_of[p.0];
                    continue;
                }
                match output_name.get(&id) {
                    Some(n) => (n.to_string(), BufferKind::Output),
                    None => (format!("{id}"), BufferKind::Intermediate),
                }
            }
            _ => continue,
        };
        buffer_of[id.0] = Some(buffers.len());
        buffers.push(Buffer {
            name,
            ty: node.ty.clone(),
            kind,
            packed_u8: node.ty.dtype == DType::U8 && node.op.is_leaf(),
        });
    }
    (buffers, buffer_of)
}
