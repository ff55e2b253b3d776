//! A model whose forward graph can be built for any batch size: a `Sequential`, or a forward
//! graph read from the text form (`--emit ir` output, possibly edited by hand).

use crate::graph::{Graph, Node, NodeId};
use crate::op::Op;
use crate::sequential::Sequential;
use crate::types::{DType, TensorType};

/// Something the trainers can build a forward graph from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Model {
    Sequential(Sequential),
    /// A forward graph with an input `x: T[N, ...]` and an output `output`; rebuilt for each
    /// batch size by replacing `N`.
    Graph(Graph),
}

impl From<Sequential> for Model {
    fn from(s: Sequential) -> Self {
        Model::Sequential(s)
    }
}

impl From<&Sequential> for Model {
    fn from(s: &Sequential) -> Self {
        Model::Sequential(s.clone())
    }
}

impl From<Graph> for Model {
    fn from(g: Graph) -> Self {
        Model::Graph(g)
    }
}

impl Model {
    /// Checks that the model fits a classification task on images of `image` (`[channels,
    /// height, width]`) with `classes` classes: it takes `[N, channels, height, width]`, its
    /// output `output` is `[N, classes]` and it has at least one parameter to train. The
    /// error says what was expected and what the model has.
    pub fn check_task(&self, image: [usize; 3], classes: usize) -> Result<(), String> {
        let [c, h, w] = image;
        let g = self.forward("model", TensorType::f32([1, c, h, w]))?;
        let out = g
            .output("output")
            .ok_or_else(|| "the model has no output named `output`".to_string())?;
        let ty = g.ty(out);
        if ty.shape != [1, classes] {
            // The batch axis is written `N`, as the expectation is.
            let got = match ty.shape.split_first() {
                None => ty.to_string(),
                Some((_, rest)) => {
                    let dims: Vec<String> = std::iter::once("N".to_string())
                        .chain(rest.iter().map(usize::to_string))
                        .collect();
                    format!("{}[{}]", ty.dtype, dims.join(","))
                }
            };
            return Err(format!(
                "the output must be the class scores, f32[N,{classes}] for the data set's \
                 {classes} classes, but the model's output is {got}"
            ));
        }
        if g.params().next().is_none() {
            return Err("the model has no parameters to train".to_string());
        }
        Ok(())
    }

    /// The forward graph for `input` (`T[batch, ...]`); a u8 input is scaled to [0, 1] first.
    pub fn forward(&self, name: &str, input: TensorType) -> Result<Graph, String> {
        match self {
            Model::Sequential(s) => s.build(name, input).map_err(|e| e.to_string()),
            Model::Graph(g) => rebatch(g, name, input),
        }
    }
}

/// Rebuilds a forward graph for another input type: `x` becomes `input` (with `scale_u8`
/// inserted when a u8 batch feeds an f32 model), and reshapes that carried the old batch size
/// in their first dimension carry the new one. Every node is re-typed, so a model that cannot
/// take the new batch is an error naming the node.
fn rebatch(g: &Graph, name: &str, input: TensorType) -> Result<Graph, String> {
    let (_, _, old) = g
        .inputs()
        .find(|(_, n, _)| *n == "x")
        .ok_or_else(|| format!("graph `{}` has no input `x`", g.name))?;
    if g.output("output").is_none() {
        return Err(format!("graph `{}` has no output `output`", g.name));
    }
    if old.rank() == 0 {
        return Err(format!(
            "graph `{}`'s input `x` is {old}, which has no batch axis",
            g.name
        ));
    }
    if old.rank() != input.rank() || old.shape[1..] != input.shape[1..] {
        return Err(format!(
            "graph `{}` takes {old}, not batches of {input}",
            g.name
        ));
    }
    let old_batch = old.shape[0];
    let new_batch = input.shape[0];
    let mut out = Graph::new(name);
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes().len());
    let fail = |id: NodeId, e: String| format!("graph `{}`, {id}: {e}", g.name);
    for (id, node) in g.iter() {
        let new = match &node.op {
            Op::Input { name: n } if n == "x" => {
                let x = out
                    .add_input("x", input.clone())
                    .map_err(|e| fail(id, e.to_string()))?;
                if input.dtype == DType::U8 && node.ty.dtype == DType::F32 {
                    out.add(Op::ScaleU8, &[x])
                        .map_err(|e| fail(id, e.to_string()))?
                } else {
                    x
                }
            }
            Op::Reshape { shape } if shape.first() == Some(&old_batch) => {
                let mut shape = shape.clone();
                shape[0] = new_batch;
                let reshaped = Node {
                    op: Op::Reshape { shape },
                    ..node.clone()
                };
                out.copy_node(&reshaped, &map)
                    .map_err(|e| fail(id, e.to_string()))?
            }
            _ => out
                .copy_node(node, &map)
                .map_err(|e| fail(id, e.to_string()))?,
        };
        map.push(new);
    }
    for o in g.outputs() {
        out.add_output(o.name.clone(), map[o.node.0])
            .map_err(|e| e.to_string())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequential::lenet;
    use crate::text::{parse, print};

    #[test]
    fn a_printed_model_rebuilds_like_the_sequential() {
        let text = print(
            &lenet()
                .build("lenet", TensorType::f32([1, 1, 28, 28]))
                .unwrap(),
        );
        let from_text = Model::from(parse(&text).unwrap());
        let input = TensorType::new(DType::U8, [96, 1, 28, 28]);
        let a = from_text.forward("m", input.clone()).unwrap();
        let b = Model::from(lenet()).forward("m", input).unwrap();
        assert_eq!(print(&a), print(&b));
    }

    #[test]
    fn models_that_do_not_fit_the_task_are_refused() {
        assert_eq!(Model::from(lenet()).check_task([1, 28, 28], 10), Ok(()));
        assert_eq!(
            Model::from(lenet()).check_task([1, 28, 28], 7).unwrap_err(),
            "the output must be the class scores, f32[N,7] for the data set's 7 classes, but \
             the model's output is f32[N,10]"
        );
        let flat = parse(
            "graph \"g\" {\n  %0 = input \"x\" : f32[1,1,28,28]\n  %1 = reshape(%0) shape=[1,784] : f32[1,784]\n  output \"output\" = %1\n}\n",
        )
        .unwrap();
        assert_eq!(
            Model::from(flat.clone())
                .check_task([1, 28, 28], 10)
                .unwrap_err(),
            "the output must be the class scores, f32[N,10] for the data set's 10 classes, but \
             the model's output is f32[N,784]"
        );
        assert_eq!(
            Model::from(flat).check_task([1, 28, 28], 784).unwrap_err(),
            "the model has no parameters to train"
        );
    }

    #[test]
    fn wrong_images_are_refused() {
        let g = lenet()
            .build("lenet", TensorType::f32([1, 1, 28, 28]))
            .unwrap();
        let e = Model::from(g)
            .forward("m", TensorType::new(DType::U8, [4, 1, 32, 32]))
            .unwrap_err();
        assert_eq!(
            e,
            "graph `lenet` takes f32[1,1,28,28], not batches of u8[4,1,32,32]"
        );
    }

    /// A scalar `x` has no batch axis to replace: rebatching it indexed past the end of its
    /// shape and panicked (reproduced with the `frontend` fuzz target).
    #[test]
    fn a_scalar_input_is_refused_not_a_panic() {
        let g = parse("graph \"g\" {\n  %0 = input \"x\" : f32[]\n  output \"output\" = %0\n}\n")
            .unwrap();
        for input in [TensorType::f32([]), TensorType::new(DType::U8, [2])] {
            assert_eq!(
                Model::from(g.clone()).forward("m", input).unwrap_err(),
                "graph `g`'s input `x` is f32[], which has no batch axis"
            );
        }
        let batched =
            parse("graph \"g\" {\n  %0 = input \"x\" : f32[3]\n  output \"output\" = %0\n}\n")
                .unwrap();
        assert_eq!(
            Model::from(batched)
                .forward("m", TensorType::f32([]))
                .unwrap_err(),
            "graph `g` takes f32[3], not batches of f32[]"
        );
    }
}
