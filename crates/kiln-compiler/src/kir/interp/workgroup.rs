//! One workgroup's invocations run at once (`Runner::run_workgroup`): each invocation on its
//! own thread, all of them sharing the module's buffers and the workgroup arrays behind one
//! lock, meeting at every barrier. Each element remembers who touched it, so that what a
//! device leaves undefined fails the run instead of passing by luck of the thread order: a
//! write that another invocation reads or writes with no barrier between (workgroup memory),
//! a write that another invocation touches at all (storage: `workgroupBarrier` orders only
//! workgroup memory), and a barrier that some invocation never reaches.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::{Buffers, EvalError, Lanes, Memory, read, write, zero};
use crate::kir::module::Entry;

/// Several invocations read the element.
const SEVERAL: u32 = u32::MAX;

/// Who touched an element in its epoch: since the last barrier for workgroup memory, the
/// whole run (epoch 0) for storage.
#[derive(Clone, Copy, Default)]
struct Touch {
    epoch: u64,
    writer: Option<u32>,
    /// A reader, or `SEVERAL`.
    reader: Option<u32>,
}

struct State<'b> {
    buffers: &'b mut Buffers,
    workgroup: Buffers,
    touches: HashMap<String, Vec<Touch>>,
    /// Barriers passed, plus one: workgroup memory's epoch.
    epoch: u64,
    /// Invocations waiting at the barrier.
    waiting: u32,
    finished: u32,
    error: Option<EvalError>,
}

impl State<'_> {
    /// Records that invocation `lid` reads (or writes) element `index` of `global`, which
    /// has `len` elements; a race is an error.
    fn touch(
        &mut self,
        global: &str,
        index: u32,
        len: usize,
        lid: u32,
        writes: bool,
    ) -> Result<(), EvalError> {
        let shared = self.workgroup.contains_key(global);
        let epoch = if shared { self.epoch } else { 0 };
        let touches = self
            .touches
            .entry(global.to_string())
            .or_insert_with(|| vec![Touch::default(); len]);
        let t = &mut touches[index as usize];
        if t.epoch != epoch {
            *t = Touch {
                epoch,
                ..Touch::default()
            };
        }
        let other = |who: Option<u32>| who.filter(|&w| w != lid);
        let conflict = if writes {
            other(t.writer)
                .map(|w| (w, "writes"))
                .or(other(t.reader).map(|r| (r, "reads")))
        } else {
            other(t.writer).map(|w| (w, "writes"))
        };
        if let Some((them, what)) = conflict {
            let them = if them == SEVERAL {
                // Only readers are several.
                "other invocations read".to_string()
            } else {
                format!("invocation {them} {what}")
            };
            let when = if shared {
                "with no barrier between"
            } else {
                "in one dispatch"
            };
            return Err(EvalError::Module(format!(
                "a data race on {global}[{index}]: invocation {lid} {} it and {them} it {when}",
                if writes { "writes" } else { "reads" },
            )));
        }
        if writes {
            t.writer = Some(lid);
        } else {
            t.reader = match t.reader {
                None => Some(lid),
                Some(r) if r == lid => Some(r),
                Some(_) => Some(SEVERAL),
            };
        }
        Ok(())
    }
}

/// A workgroup's memory and its barrier, shared by its invocations' threads.
pub(super) struct Shared<'b> {
    state: Mutex<State<'b>>,
    turn: Condvar,
    size: u32,
}

impl<'b> Shared<'b> {
    /// The memory of `entry`'s workgroup over `buffers`, its workgroup arrays zeroed.
    pub fn new(entry: &Entry, buffers: &'b mut Buffers) -> Shared<'b> {
        let workgroup = entry
            .workgroup
            .iter()
            .map(|(name, ty, len)| {
                let element = match zero(*ty) {
                    Lanes::Scalar(z) => vec![z],
                    Lanes::Vec4(z) => z.to_vec(),
                    Lanes::Array(_) => unreachable!("zero is no array"),
                };
                (name.clone(), element.repeat(*len as usize))
            })
            .collect();
        Shared {
            state: Mutex::new(State {
                buffers,
                workgroup,
                touches: HashMap::new(),
                epoch: 1,
                waiting: 0,
                finished: 0,
                error: None,
            }),
            turn: Condvar::new(),
            size: entry.workgroup_size,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<'b>> {
        // A thread that panicked holding the lock left the state as it was: the panic is
        // what the run reports (`std::thread::scope` raises it again).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Invocation `lid`'s view of the memory. Its thread ends the invocation when it drops
    /// it (after [`Invocation::finish`], or while unwinding from a panic), so that no other
    /// invocation waits for it at a barrier.
    pub fn invocation(&self, lid: u32) -> Invocation<'_, 'b> {
        Invocation {
            shared: self,
            lid,
            finished: false,
        }
    }

    /// Lets the invocations at the barrier go on (an error if some never reached it).
    fn release(&self, s: &mut State) {
        if s.finished > 0 {
            s.error.get_or_insert(EvalError::Module(format!(
                "a barrier that {} of the workgroup's {} invocations never reached",
                s.finished, self.size
            )));
        }
        s.waiting = 0;
        s.epoch += 1;
        self.turn.notify_all();
    }

    /// The first error of any invocation.
    pub fn result(self) -> Result<(), EvalError> {
        let s = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        s.error.map_or(Ok(()), Err)
    }
}

/// One invocation's loads, stores and barriers.
pub(super) struct Invocation<'s, 'b> {
    shared: &'s Shared<'b>,
    lid: u32,
    finished: bool,
}

impl Invocation<'_, '_> {
    /// Ends the invocation with its outcome.
    pub fn finish(&mut self, result: Result<(), EvalError>) {
        let mut s = self.shared.lock();
        if let Err(e) = result {
            s.error.get_or_insert(e);
        }
        if !self.finished {
            self.finished = true;
            s.finished += 1;
            if s.waiting > 0 && s.waiting + s.finished == self.shared.size {
                self.shared.release(&mut s);
            }
        }
        if s.error.is_some() {
            self.shared.turn.notify_all();
        }
    }
}

impl Drop for Invocation<'_, '_> {
    fn drop(&mut self) {
        if !self.finished {
            let lid = self.lid;
            self.finish(Err(EvalError::Module(format!(
                "invocation {lid} stopped without finishing"
            ))));
        }
    }
}

impl Memory for Invocation<'_, '_> {
    fn load(&mut self, global: &str, index: u32, w: usize) -> Result<Lanes, EvalError> {
        let mut s = self.shared.lock();
        let data = s.workgroup.get(global).or(s.buffers.get(global));
        let value = read(data, global, index, w)?;
        let len = data.map_or(0, |d| d.len() / w);
        s.touch(global, index, len, self.lid, false)?;
        Ok(value)
    }

    fn store(
        &mut self,
        global: &str,
        index: u32,
        value: &Lanes,
        w: usize,
    ) -> Result<(), EvalError> {
        let mut s = self.shared.lock();
        let s = &mut *s;
        let data = match s.workgroup.get_mut(global) {
            Some(d) => Some(d),
            None => s.buffers.get_mut(global),
        };
        let len = data.as_ref().map_or(0, |d| d.len() / w);
        write(data, global, index, value, w)?;
        s.touch(global, index, len, self.lid, true)
    }

    fn local_index(&self) -> Option<u32> {
        Some(self.lid)
    }

    fn barrier(&mut self) -> Result<(), EvalError> {
        let shared = self.shared;
        let mut s = shared.lock();
        if s.error.is_none() {
            s.waiting += 1;
            if s.waiting + s.finished == shared.size {
                shared.release(&mut s);
            } else {
                let epoch = s.epoch;
                s = shared
                    .turn
                    .wait_while(s, |s| s.epoch == epoch && s.error.is_none())
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        match &s.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::kir::interp::{Buffers, Runner, Value};
    use crate::kir::module::{Declaration, Entry, Module};
    use crate::kir::{BinOp, Builder, Expr, Global, Space, Ty};

    /// Invocation `lid` of 8 writes `lid + 1` to workgroup slot `lid`, then a tree reduction
    /// halves the stride (a barrier after each step where `barriers`), `tail` adds one more
    /// statement before invocation 0 stores slot 0: 1 + 2 + ... + 8 = 36.
    fn tree_sum(barriers: bool, tail: impl Fn(&mut Builder, Expr, usize, usize)) -> Module {
        let mut f = Builder::entry(Vec::new());
        let part = f.global(Global {
            name: "part".into(),
            space: Space::Workgroup,
            elem: Ty::F32,
        });
        let out = f.global(Global {
            name: "out".into(),
            space: Space::Storage { read_only: false },
            elem: Ty::F32,
        });
        let lid = f.local_index();
        let x = f.cast(crate::kir::Scalar::F32, lid);
        let one = f.f32(1.0);
        let x = f.add(x, one);
        f.store(part, lid, x);
        f.barrier();
        let (four, two) = (f.u32(4), f.u32(2));
        let positive = |f: &mut Builder, s: Expr| {
            let z = f.u32(0);
            f.bin(BinOp::Gt, s, z)
        };
        f.loop_("stride", four, (&positive, two, true), |f, stride| {
            let inside = f.bin(BinOp::Lt, lid, stride);
            f.if_(inside, |f| {
                let other = f.add(lid, stride);
                let (a, b) = (f.load(part, lid), f.load(part, other));
                let sum = f.add(a, b);
                f.store(part, lid, sum);
            });
            if barriers {
                f.barrier();
            }
        });
        tail(&mut f, lid, part, out);
        let z = f.u32(0);
        let first = f.bin(BinOp::Eq, lid, z);
        f.if_(first, |f| {
            let zero = f.u32(0);
            let total = f.load(part, zero);
            f.store(out, zero, total);
        });
        Module {
            declarations: vec![Declaration {
                slot: 0,
                global: Global {
                    name: "out".into(),
                    space: Space::Storage { read_only: false },
                    elem: Ty::F32,
                },
                len: None,
            }],
            items: Vec::new(),
            entry: Entry {
                workgroup_size: 8,
                function: f.finish(),
                callees: Vec::new(),
                workgroup: vec![("part".into(), Ty::F32, 8)],
                spans: Vec::new(),
            },
        }
    }

    fn run(module: &Module) -> Result<Vec<Value>, String> {
        let mut buffers = Buffers::new();
        buffers.insert("out".into(), vec![Value::F32(0.0); 8]);
        let runner = Runner::new(module).map_err(|e| e.to_string())?;
        runner
            .run_workgroup(&mut buffers)
            .map_err(|e| e.to_string())?;
        Ok(buffers.remove("out").unwrap())
    }

    #[test]
    fn a_tree_reduction_meets_at_its_barriers() {
        let module = tree_sum(true, |_, _, _, _| {});
        // The module is valid WGSL, as the device gets it.
        let text = module.print().unwrap();
        naga::front::wgsl::parse_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        // Every run, whatever order the threads take.
        for _ in 0..20 {
            assert_eq!(run(&module).unwrap()[0], Value::F32(36.0));
        }
        // One invocation at a time cannot run it.
        let err = Runner::new(&module)
            .unwrap()
            .run([0, 0], &mut Buffers::new())
            .unwrap_err();
        assert!(err.to_string().contains("run_workgroup"), "{err}");
    }

    #[test]
    fn a_missing_barrier_is_a_race() {
        let err = run(&tree_sum(false, |_, _, _, _| {})).unwrap_err();
        assert!(
            err.contains("a data race on part[") && err.ends_with("it with no barrier between"),
            "{err}"
        );
    }

    #[test]
    fn a_barrier_some_invocations_skip_is_an_error() {
        let module = tree_sum(true, |f, lid, _, _| {
            let four = f.u32(4);
            let low = f.bin(BinOp::Lt, lid, four);
            f.if_(low, |f| f.barrier());
        });
        let err = run(&module).unwrap_err();
        assert!(
            err.contains("a barrier that 4 of the workgroup's 8 invocations never reached"),
            "{err}"
        );
    }

    #[test]
    fn storage_written_by_two_invocations_is_a_race_even_across_barriers() {
        let module = tree_sum(true, |f, lid, _, out| {
            let two = f.u32(2);
            let low = f.bin(BinOp::Lt, lid, two);
            f.if_(low, |f| {
                let seven = f.u32(7);
                let x = f.f32(1.0);
                f.store(out, seven, x);
            });
            f.barrier();
        });
        let err = run(&module).unwrap_err();
        assert!(
            err.contains("a data race on out[7]: invocation")
                && err.ends_with("writes it in one dispatch"),
            "{err}"
        );
    }

    #[test]
    fn reads_past_the_end_of_workgroup_memory_fail() {
        let module = tree_sum(true, |f, lid, part, _| {
            let eight = f.u32(8);
            let past = f.add(lid, eight);
            let x = f.load(part, past);
            f.store(part, lid, x);
            f.barrier();
        });
        let err = run(&module).unwrap_err();
        assert!(
            err.contains("part[") && err.contains("out of bounds (8 elements)"),
            "{err}"
        );
    }
}
