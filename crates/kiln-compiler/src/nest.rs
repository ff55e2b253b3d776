//! A map kernel's loop nest as data: the index space its invocations enumerate, and the
//! splits its schedule makes of it.
//!
//! The space is a row-major nest of axes (a node's shape, or a view of its flat index such
//! as `[outer, axis, inner]` around one axis). A [`Split`] gives every invocation `factor`
//! coordinates of one axis, held as lanes of a `vec4`, rows of accumulators, a second rows
//! axis or kernel columns: either `factor` consecutive coordinates ([`Spread::Block`]) or
//! one in each `factor`th part of the axis ([`Spread::Parts`], lanes a quarter of an axis
//! apart, so that each reads one of four uniform parts). [`Nest::invocations`] turns the
//! splits into the invocation grid (what is left of each axis, adjacent axes merged where
//! they are contiguous, so an invocation decodes no more coordinates than it needs) and the
//! flat offsets of the elements each invocation holds. `lower.rs` lowers every map recipe's
//! entry point from it ([`first_element`]), the module header prints it, and the tests check
//! that every transform covers the space exactly once.

use std::fmt;

use crate::kir;

/// What an invocation holds of a split axis: the names of the schedule's blocked dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Held {
    /// The four lanes of a `vec4`.
    Lanes,
    /// Rows of `vec4` accumulators.
    Rows,
    /// A second rows axis (adjacent columns per row).
    Inner,
    /// Kernel columns of a weight gradient, or every column of a row.
    Columns,
    /// Channels of a convolution, accumulated one after another.
    Channels,
}

/// Which coordinates of the split axis an invocation takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spread {
    /// `factor` consecutive coordinates.
    Block,
    /// One coordinate in each of the axis's `factor` parts, `extent / factor` apart.
    Parts,
}

/// One transform of the loop nest: `factor` coordinates of `axis` per invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    pub axis: usize,
    pub factor: usize,
    pub spread: Spread,
    pub held: Held,
}

impl Split {
    pub fn block(axis: usize, factor: usize, held: Held) -> Split {
        Split {
            axis,
            factor,
            spread: Spread::Block,
            held,
        }
    }

    pub fn parts(axis: usize, factor: usize, held: Held) -> Split {
        Split {
            axis,
            factor,
            spread: Spread::Parts,
            held,
        }
    }
}

/// A kernel's loop nest: the space its invocations enumerate, the splits of it, and the
/// order of the grid's axes (outermost first; empty for the shape's own order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Nest {
    pub shape: Vec<usize>,
    pub splits: Vec<Split>,
    pub order: Vec<usize>,
}

/// One axis of an invocation grid: `extent` coordinates, `step` apart in the flat index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Axis {
    pub extent: usize,
    pub step: usize,
}

/// A split as an invocation holds it: `factor` elements, `gap` apart in the flat index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeldAxis {
    pub held: Held,
    pub factor: usize,
    pub gap: usize,
}

/// What [`Nest::invocations`] makes of a nest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Invocations {
    /// The grid an invocation's index is decoded in (row-major; empty for one invocation),
    /// and how far each coordinate moves its first element.
    pub grid: Vec<Axis>,
    /// The grid before merging: each axis of more than one coordinate, by its axis of the
    /// nest, in the grid's order.
    pub axes: Vec<(usize, Axis)>,
    /// The split axes, in the splits' order.
    pub held: Vec<HeldAxis>,
}

/// Why a nest's splits cannot be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NestError {
    NoAxis {
        axis: usize,
        rank: usize,
    },
    NotAnOrder {
        order: Vec<usize>,
    },
    SplitTwice {
        axis: usize,
    },
    HeldTwice {
        held: Held,
    },
    Uneven {
        axis: usize,
        extent: usize,
        factor: usize,
    },
}

impl fmt::Display for NestError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            NestError::NoAxis { axis, rank } => {
                write!(f, "axis {axis} split in a nest of {rank} axes")
            }
            NestError::NotAnOrder { order } => write!(f, "{order:?} orders no grid"),
            NestError::SplitTwice { axis } => write!(f, "axis {axis} split twice"),
            NestError::HeldTwice { held } => write!(f, "two splits held as {held}"),
            NestError::Uneven {
                axis,
                extent,
                factor,
            } => write!(f, "axis {axis} of {extent} split by {factor}"),
        }
    }
}

impl Nest {
    /// The space with no splits: one invocation per element.
    pub fn elements(shape: &[usize]) -> Nest {
        Nest::new(shape.to_vec(), Vec::new())
    }

    /// `shape` split by `splits`, its grid in the shape's order.
    pub fn new(shape: Vec<usize>, splits: Vec<Split>) -> Nest {
        Nest {
            shape,
            splits,
            order: Vec::new(),
        }
    }

    /// The grid's axes, outermost first.
    fn order(&self) -> Vec<usize> {
        if self.order.is_empty() {
            (0..self.shape.len()).collect()
        } else {
            self.order.clone()
        }
    }

    #[cfg(test)]
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The invocation grid and the held axes. Each split divides its axis: a block's outer
    /// part steps `factor` coordinates, its held elements one apart; a part split's outer
    /// part steps one coordinate, its held elements `extent / factor` apart. Axes of one
    /// coordinate leave the grid, and neighbours merge where the outer one steps exactly
    /// over the inner one's whole extent (the invocation-to-element map is unchanged).
    pub fn invocations(&self) -> Result<Invocations, NestError> {
        let rank = self.shape.len();
        let strides = crate::compute::strides(&self.shape);
        let mut grid: Vec<Axis> = (0..rank)
            .map(|d| Axis {
                extent: self.shape[d],
                step: strides[d],
            })
            .collect();
        let mut split = vec![false; rank];
        let mut held = Vec::new();
        for s in &self.splits {
            if s.axis >= rank {
                return Err(NestError::NoAxis { axis: s.axis, rank });
            }
            if std::mem::replace(&mut split[s.axis], true) {
                return Err(NestError::SplitTwice { axis: s.axis });
            }
            if held.iter().any(|h: &HeldAxis| h.held == s.held) {
                return Err(NestError::HeldTwice { held: s.held });
            }
            let extent = self.shape[s.axis];
            if s.factor == 0 || extent % s.factor != 0 {
                return Err(NestError::Uneven {
                    axis: s.axis,
                    extent,
                    factor: s.factor,
                });
            }
            let outer = extent / s.factor;
            let st = strides[s.axis];
            let (step, gap) = match s.spread {
                Spread::Block => (s.factor * st, st),
                Spread::Parts => (st, outer * st),
            };
            grid[s.axis] = Axis {
                extent: outer,
                step,
            };
            held.push(HeldAxis {
                held: s.held,
                factor: s.factor,
                gap,
            });
        }
        let order = self.order();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        if sorted != (0..rank).collect::<Vec<_>>() {
            return Err(NestError::NotAnOrder { order });
        }
        let axes: Vec<(usize, Axis)> = order
            .into_iter()
            .map(|d| (d, grid[d]))
            .filter(|(_, a)| a.extent > 1)
            .collect();
        let mut merged: Vec<Axis> = Vec::new();
        for &(_, a) in &axes {
            match merged.last_mut() {
                Some(last) if last.step == a.extent * a.step => {
                    *last = Axis {
                        extent: last.extent * a.extent,
                        step: a.step,
                    }
                }
                _ => merged.push(a),
            }
        }
        Ok(Invocations {
            grid: merged,
            axes,
            held,
        })
    }
}

impl Invocations {
    /// How many invocations run.
    pub fn count(&self) -> usize {
        self.grid.iter().map(|a| a.extent).product()
    }

    /// The held axis `held`, if split.
    pub fn axis(&self, held: Held) -> Option<HeldAxis> {
        self.held.iter().copied().find(|h| h.held == held)
    }

    /// How many elements of `held` an invocation holds (1 where none is split).
    pub fn factor(&self, held: Held) -> usize {
        self.axis(held).map_or(1, |h| h.factor)
    }

    /// The flat offsets from an invocation's first element of the elements it holds along
    /// `order` (row-major: the last varies fastest), each with its coordinates in `order`;
    /// an axis in `order` that is not split holds one element.
    pub fn offsets(&self, order: &[Held]) -> Vec<(Vec<usize>, usize)> {
        let mut out = vec![(Vec::new(), 0)];
        for &h in order {
            let (factor, gap) = self.axis(h).map_or((1, 0), |a| (a.factor, a.gap));
            out = out
                .into_iter()
                .flat_map(|(coords, at)| {
                    (0..factor).map(move |k| {
                        let mut c = coords.clone();
                        c.push(k);
                        (c, at + k * gap)
                    })
                })
                .collect();
        }
        out
    }

    /// The first element of invocation `j` (the Rust meaning of [`first_element`]).
    #[cfg(test)]
    pub fn first(&self, j: usize) -> usize {
        let mut rest = j;
        let mut at = 0;
        for a in self.grid.iter().rev() {
            at += rest % a.extent * a.step;
            rest /= a.extent;
        }
        at
    }
}

/// Invocation `j`'s coordinate on each axis of the nest (`names[axis]`), decoded from the
/// grid before merging; an axis of one coordinate left (held whole) is at 0.
pub(crate) fn coordinates(
    f: &mut kir::Builder,
    j: kir::Expr,
    inv: &Invocations,
    names: &[&str],
) -> Vec<kir::Expr> {
    let extents: Vec<usize> = inv.axes.iter().map(|(_, a)| a.extent).collect();
    let refs: Vec<&str> = inv.axes.iter().map(|(d, _)| names[*d]).collect();
    let decoded = f.decode(j, &refs, &extents);
    (0..names.len())
        .map(|d| match inv.axes.iter().position(|(a, _)| *a == d) {
            Some(k) => decoded[k],
            None => f.u32(0),
        })
        .collect()
}

/// `i`, the first element of invocation `j`: `j` itself where the grid is one axis of
/// consecutive elements, `j * step` for one axis, else `j`'s grid coordinates (`g0`, ...)
/// each times its step.
pub(crate) fn first_element(f: &mut kir::Builder, j: kir::Expr, inv: &Invocations) -> kir::Expr {
    match inv.grid.as_slice() {
        [] => f.u32(0),
        [a] if a.step == 1 => j,
        [a] => {
            let step = f.u32(a.step);
            let first = f.mul(j, step);
            f.let_("i", kir::Ty::U32, first)
        }
        grid => {
            let names: Vec<String> = (0..grid.len()).map(|d| format!("g{d}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let extents: Vec<usize> = grid.iter().map(|a| a.extent).collect();
            let coords = f.decode(j, &refs, &extents);
            let mut first = None;
            for (c, a) in coords.into_iter().zip(grid) {
                let term = if a.step == 1 {
                    c
                } else {
                    let step = f.u32(a.step);
                    f.mul(c, step)
                };
                first = Some(match first {
                    None => term,
                    Some(sum) => f.add(sum, term),
                });
            }
            f.let_("i", kir::Ty::U32, first.expect("a grid has axes"))
        }
    }
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Held::Lanes => "lanes",
            Held::Rows => "rows",
            Held::Inner => "inner rows",
            Held::Columns => "columns",
            Held::Channels => "channels",
        })
    }
}

/// `[256, 120], axis 1 / 4 lanes (parts), axis 0 / 8 rows: grid 32 x 30`: the nest's
/// shape, each split, and the grid of invocations left.
impl fmt::Display for Nest {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "[{}]", shape.join(", "))?;
        for s in &self.splits {
            let parts = match s.spread {
                Spread::Block => "",
                Spread::Parts => " one per part",
            };
            write!(f, ", axis {} / {} {}{parts}", s.axis, s.factor, s.held)?;
        }
        if !self.order.is_empty() {
            let order: Vec<String> = self.order.iter().map(|d| d.to_string()).collect();
            write!(f, ", grid order {}", order.join(" "))?;
        }
        match self.invocations() {
            Ok(inv) => {
                let grid: Vec<String> = inv.grid.iter().map(|a| a.extent.to_string()).collect();
                let grid = if grid.is_empty() {
                    "1".to_string()
                } else {
                    grid.join(" x ")
                };
                write!(f, ": grid {grid}")
            }
            Err(e) => write!(f, ": {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every element of the nest, as each invocation holds them.
    fn covered(nest: &Nest) -> Vec<usize> {
        let inv = nest.invocations().unwrap();
        let order: Vec<Held> = inv.held.iter().map(|h| h.held).collect();
        let offsets = inv.offsets(&order);
        let mut all = Vec::new();
        for j in 0..inv.count() {
            let first = inv.first(j);
            all.extend(offsets.iter().map(|(_, off)| first + off));
        }
        all
    }

    #[test]
    fn a_block_of_lanes_steps_four_coordinates() {
        let nest = Nest::new(vec![2, 8, 3], vec![Split::block(1, 4, Held::Lanes)]);
        let inv = nest.invocations().unwrap();
        // [2, 2 (step 12), 3 (step 1)]: the outer two merge (24 = 2 * 12).
        assert_eq!(
            inv.grid,
            vec![
                Axis {
                    extent: 4,
                    step: 12
                },
                Axis { extent: 3, step: 1 }
            ]
        );
        assert_eq!(inv.offsets(&[Held::Lanes]).last().unwrap().1, 9);
        let mut all = covered(&nest);
        all.sort_unstable();
        assert_eq!(all, (0..48).collect::<Vec<_>>());
    }

    #[test]
    fn lanes_one_per_part_are_a_quarter_of_the_axis_apart() {
        let nest = Nest::new(
            vec![256, 120],
            vec![
                Split::parts(1, 4, Held::Lanes),
                Split::block(0, 8, Held::Rows),
            ],
        );
        let inv = nest.invocations().unwrap();
        assert_eq!(
            inv.grid,
            vec![
                Axis {
                    extent: 32,
                    step: 960
                },
                Axis {
                    extent: 30,
                    step: 1
                }
            ]
        );
        let offsets = inv.offsets(&[Held::Rows, Held::Lanes]);
        assert_eq!(offsets[1], (vec![0, 1], 30));
        assert_eq!(offsets[4], (vec![1, 0], 120));
        assert_eq!(
            nest.to_string(),
            "[256, 120], axis 1 / 4 lanes one per part, axis 0 / 8 rows: grid 32 x 30"
        );
    }

    #[test]
    fn whole_axes_leave_the_grid_and_the_rest_merges() {
        // Kernel columns: a [16, 6, 5, 5] weight gradient, 5 columns per invocation.
        let nest = Nest::new(vec![16, 6, 5, 5], vec![Split::block(3, 5, Held::Columns)]);
        let inv = nest.invocations().unwrap();
        assert_eq!(
            inv.grid,
            vec![Axis {
                extent: 480,
                step: 5
            }]
        );
        assert_eq!(
            Nest::elements(&[3, 4]).invocations().unwrap().grid,
            vec![Axis {
                extent: 12,
                step: 1
            }]
        );
        let one = Nest::new(vec![4], vec![Split::block(0, 4, Held::Lanes)]);
        assert_eq!(one.invocations().unwrap().count(), 1);
        assert!(one.invocations().unwrap().grid.is_empty());
    }

    #[test]
    fn bad_splits_are_errors() {
        let nest = |splits| Nest::new(vec![6, 4], splits);
        assert_eq!(
            nest(vec![Split::block(0, 4, Held::Rows)]).invocations(),
            Err(NestError::Uneven {
                axis: 0,
                extent: 6,
                factor: 4
            })
        );
        assert_eq!(
            nest(vec![Split::block(2, 1, Held::Rows)]).invocations(),
            Err(NestError::NoAxis { axis: 2, rank: 2 })
        );
        let twice = vec![
            Split::block(1, 2, Held::Rows),
            Split::block(1, 2, Held::Lanes),
        ];
        assert_eq!(
            nest(twice).invocations(),
            Err(NestError::SplitTwice { axis: 1 })
        );
        let mut unordered = nest(vec![]);
        unordered.order = vec![0, 0];
        assert_eq!(
            unordered.invocations(),
            Err(NestError::NotAnOrder { order: vec![0, 0] })
        );
        let both_rows = vec![
            Split::block(0, 2, Held::Rows),
            Split::block(1, 2, Held::Rows),
        ];
        assert_eq!(
            nest(both_rows).invocations(),
            Err(NestError::HeldTwice { held: Held::Rows })
        );
    }

    /// A nest with up to three splits of distinct axes, each dividing its axis and held as
    /// its own kind, and its grid in any order.
    fn nests() -> impl Strategy<Value = Nest> {
        prop::collection::vec(1usize..5, 1..5).prop_flat_map(|blocks| {
            let rank = blocks.len();
            (
                Just(blocks),
                prop::collection::vec(1usize..4, rank),
                prop::collection::vec(any::<bool>(), rank),
                Just([Held::Lanes, Held::Rows, Held::Inner, Held::Columns]).prop_shuffle(),
                Just((0..rank).collect::<Vec<usize>>()).prop_shuffle(),
            )
                .prop_map(|(blocks, outer, how, held, order)| {
                    let shape: Vec<usize> = blocks.iter().zip(&outer).map(|(b, o)| b * o).collect();
                    let splits = how
                        .iter()
                        .enumerate()
                        .filter(|(d, _)| blocks[*d] > 1 || d % 2 == 0)
                        .take(3)
                        .zip(held)
                        .map(|((d, &parts), held)| Split {
                            axis: d,
                            factor: blocks[d],
                            spread: if parts { Spread::Parts } else { Spread::Block },
                            held,
                        })
                        .collect();
                    Nest {
                        shape,
                        splits,
                        order,
                    }
                })
        })
    }

    /// A function that reads nothing but its index.
    struct NoReads;

    impl kir::interp::Env for NoReads {
        fn operand(&mut self, k: usize, _: u32) -> kir::interp::Lanes {
            unreachable!("no operand {k}")
        }
        fn chunk(&self, _: kir::ChunkBound) -> u32 {
            unreachable!("not in a chunk")
        }
    }

    proptest! {
        /// Whatever the splits, the invocations' elements are the whole space, each once:
        /// no element is left unstored or stored twice.
        #[test]
        fn every_nest_covers_its_space_exactly_once(nest in nests()) {
            let mut all = covered(&nest);
            all.sort_unstable();
            prop_assert_eq!(all, (0..nest.numel()).collect::<Vec<_>>());
        }

        /// The kernel IR of an invocation's first element computes what the grid says, on
        /// the interpreter.
        #[test]
        fn the_first_element_lowers_to_what_the_grid_says(nest in nests()) {
            let inv = nest.invocations().unwrap();
            let mut f = kir::Builder::new(kir::Ty::U32, vec![]);
            let j = f.index();
            let i = first_element(&mut f, j, &inv);
            f.ret_(i);
            let function = f.finish();
            for j in 0..inv.count() {
                let got = kir::interp::eval(&function, j as u32, &mut NoReads).unwrap();
                let want = kir::interp::Lanes::Scalar(kir::interp::Value::U32(inv.first(j) as u32));
                prop_assert_eq!(got, Some(want), "invocation {}", j);
            }
        }

        /// Each axis's coordinate, decoded on the interpreter, places the invocation's first
        /// element where the merged grid does.
        #[test]
        fn coordinates_place_the_first_element_as_the_grid_does(nest in nests()) {
            let inv = nest.invocations().unwrap();
            let names: Vec<String> = (0..nest.shape.len()).map(|d| format!("c{d}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut f = kir::Builder::new(kir::Ty::U32, vec![]);
            let j = f.index();
            let coords = coordinates(&mut f, j, &inv, &names);
            let mut at = f.u32(0);
            for (d, c) in coords.into_iter().enumerate() {
                let step = inv.axes.iter().find(|(a, _)| *a == d).map_or(0, |(_, a)| a.step);
                let step = f.u32(step);
                let term = f.mul(c, step);
                at = f.add(at, term);
            }
            f.ret_(at);
            let function = f.finish();
            for j in 0..inv.count() {
                let got = kir::interp::eval(&function, j as u32, &mut NoReads).unwrap();
                let want = kir::interp::Lanes::Scalar(kir::interp::Value::U32(inv.first(j) as u32));
                prop_assert_eq!(got, Some(want), "invocation {}", j);
            }
        }
    }
}
