    // Tree reduction over the workgroup: {{WG}} partial sums become one in slot 0.
    part_loss[lid] = loss;
    part_count[lid] = count;
    workgroupBarrier();
    for (var stride = {{WG}}u / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            part_loss[lid] = part_loss[lid] + part_loss[lid + stride];
            part_count[lid] = part_count[lid] + part_count[lid + stride];
        }
        workgroupBarrier();
    }
