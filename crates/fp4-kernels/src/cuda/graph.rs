//! CUDA graphs with programmatic dependent launch (PDL, sm_90+). A captured graph of decode is a
//! chain of a few hundred kernels, many of them a few microseconds long; between two ordinary
//! kernels the GPU drains the first before it starts the second. Here every edge between two of
//! fp4's own kernels becomes programmatic: the second kernel's blocks start while the first
//! drains (the GEMVs issue their first weight loads) and wait in `pdl_wait()` for its results.
//! `kernels/pdl.cuh` states the contract the kernels keep; build.rs checks that each kernel waits.
//! Edges from or to anything else (cuBLAS, copies) stay ordinary.

use super::{CudaError, Result};
use cudarc::driver::sys::{self, CUgraphEdgeData, CUgraphNode};
use cudarc::driver::{result, CudaStream};
use std::sync::Arc;

/// A captured, instantiated CUDA graph (see [`super::Gpu::capture`]).
pub struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
    programmatic_edges: usize,
}

impl Graph {
    /// Queues one replay on the stream it was captured on.
    pub fn launch(&self) -> Result<()> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: exec and stream live as long as self.
        unsafe { result::graph::launch(self.exec, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// Edges turned programmatic (0 when PDL was off at capture).
    pub fn programmatic_edges(&self) -> usize {
        self.programmatic_edges
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: both handles are owned by self and destroyed once.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// Ends the capture on `stream`; with `pdl`, turns the edges between two kernels of `ours` (the
/// modules fp4 loaded) programmatic; instantiates. `None`: nothing was captured.
pub(super) fn end_capture(stream: &Arc<CudaStream>, pdl: bool, ours: &[sys::CUmodule]) -> Result<Option<Graph>> {
    stream.context().bind_to_thread()?;
    // SAFETY: the stream is capturing (Gpu::capture began it).
    let graph = unsafe { result::stream::end_capture(stream.cu_stream()) }?;
    if graph.is_null() {
        return Ok(None);
    }
    let built = (|| {
        // SAFETY: graph is a valid, not yet instantiated graph.
        let programmatic_edges = if pdl { unsafe { make_programmatic(graph, ours) }? } else { 0 };
        // SAFETY: as above.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }?;
        Ok(Graph { graph, exec, stream: stream.clone(), programmatic_edges })
    })();
    if built.is_err() {
        // SAFETY: not instantiated; destroyed once.
        let _ = unsafe { result::graph::destroy(graph) };
    }
    built.map(Some)
}

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    r.result().map_err(|e| CudaError(format!("CUDA graph: {what}: {e}")))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// One of fp4's kernels (keeps the `kernels/pdl.cuh` contract).
    Ours,
    /// A graph-memory allocation or free.
    Memory,
    /// Anything else (cuBLAS, copies, memsets).
    Other,
}

unsafe fn kind(node: CUgraphNode, ours: &[sys::CUmodule]) -> Result<Kind> {
    use sys::CUgraphNodeType as T;
    let mut t = T::CU_GRAPH_NODE_TYPE_EMPTY;
    check(sys::cuGraphNodeGetType(node, &mut t), "node type")?;
    Ok(match t {
        T::CU_GRAPH_NODE_TYPE_MEM_ALLOC | T::CU_GRAPH_NODE_TYPE_MEM_FREE => Kind::Memory,
        T::CU_GRAPH_NODE_TYPE_KERNEL => {
            let mut p: sys::CUDA_KERNEL_NODE_PARAMS = std::mem::zeroed();
            check(sys::cuGraphKernelNodeGetParams_v2(node, &mut p), "kernel node parameters")?;
            let mut m: sys::CUmodule = std::ptr::null_mut();
            if !p.func.is_null() {
                check(sys::cuFuncGetModule(&mut m, p.func), "kernel module")?;
            }
            if !m.is_null() && ours.contains(&m) {
                Kind::Ours
            } else {
                Kind::Other
            }
        }
        _ => Kind::Other,
    })
}

/// Turns each edge between two consecutive kernels of fp4 in a captured chain (one stream: every
/// node has at most one predecessor and one successor) into a programmatic one. Returns how many;
/// 0, graph untouched, for anything but a chain or a graph with memory nodes (their edges cannot
/// be changed; captures allocate from the graph pool instead, `cuda/buffer.rs`).
unsafe fn make_programmatic(graph: sys::CUgraph, ours: &[sys::CUmodule]) -> Result<usize> {
    let mut n = 0usize;
    let none = std::ptr::null_mut::<CUgraphNode>();
    let null: CUgraphNode = std::ptr::null_mut();
    check(sys::cuGraphGetEdges_v2(graph, none, none, std::ptr::null_mut(), &mut n), "edge count")?;
    let (mut from, mut to): (Vec<CUgraphNode>, Vec<CUgraphNode>) = (vec![null; n], vec![null; n]);
    let mut data: Vec<CUgraphEdgeData> = vec![std::mem::zeroed(); n];
    check(sys::cuGraphGetEdges_v2(graph, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut n), "edges")?;
    let default = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_DEFAULT as u8;
    let (mut outs, mut ins) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    for i in 0..n {
        if data[i].type_ != default || !outs.insert(from[i]) || !ins.insert(to[i]) {
            return Ok(0);
        }
    }
    let mut sel = Vec::new();
    for i in 0..n {
        let (a, b) = (kind(from[i], ours)?, kind(to[i], ours)?);
        if a == Kind::Memory || b == Kind::Memory {
            return Ok(0);
        }
        if a == Kind::Ours && b == Kind::Ours {
            sel.push(i);
        }
    }
    if sel.is_empty() {
        return Ok(0);
    }
    let (sf, st): (Vec<CUgraphNode>, Vec<CUgraphNode>) = sel.iter().map(|&i| (from[i], to[i])).unzip();
    let old: Vec<CUgraphEdgeData> = sel.iter().map(|&i| data[i]).collect();
    check(sys::cuGraphRemoveDependencies_v2(graph, sf.as_ptr(), st.as_ptr(), old.as_ptr(), sel.len()), "remove edges")?;
    let mut pe: CUgraphEdgeData = std::mem::zeroed();
    pe.from_port = sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8;
    pe.type_ = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
    let new = vec![pe; sel.len()];
    check(
        sys::cuGraphAddDependencies_v2(graph, sf.as_ptr(), st.as_ptr(), new.as_ptr(), sel.len()),
        "add programmatic edges",
    )?;
    Ok(sel.len())
}
